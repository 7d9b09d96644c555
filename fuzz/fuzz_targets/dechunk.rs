#![no_main]
// See imlinkd::fuzzing::dechunk for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| imlinkd::fuzzing::dechunk(data));
