#![no_main]
// See imlink_auth::fuzzing::callout_request for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| imlink_auth::fuzzing::callout_request(data));
