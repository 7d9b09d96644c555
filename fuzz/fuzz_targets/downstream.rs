#![no_main]
// See imlinkd::fuzzing::downstream for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| imlinkd::fuzzing::downstream(data));
