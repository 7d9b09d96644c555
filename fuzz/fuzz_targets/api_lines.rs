#![no_main]
// See imlinkd::fuzzing::api_lines for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| imlinkd::fuzzing::api_lines(data));
