#![no_main]
// See imlinkd::fuzzing::status_text for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| imlinkd::fuzzing::status_text(data));
