#![no_main]
// See imlinkd::fuzzing::usersig for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| imlinkd::fuzzing::usersig(data));
