//! The server's IAM verification of an auth payload, STS answering locally.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_aws::fuzzing::auth_verify(data));
