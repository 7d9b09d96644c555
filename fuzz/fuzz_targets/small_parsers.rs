#![no_main]
// See imlinkd::fuzzing::small_parsers for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| imlinkd::fuzzing::small_parsers(data));
