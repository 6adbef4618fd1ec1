//! The IAM auth payload decoder.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_aws::fuzzing::auth_payload(data));
