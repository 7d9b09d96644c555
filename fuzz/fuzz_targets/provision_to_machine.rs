#![no_main]
// See imlinkd::fuzzing::provision_to_machine for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| imlinkd::fuzzing::provision_to_machine(data));
