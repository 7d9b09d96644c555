#![no_main]
// See imlinkd::fuzzing::received_message for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| imlinkd::fuzzing::received_message(data));
