//! The local control host's HTTP request reader, fed over a socket on 127.0.0.1.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_aws::fuzzing::control_local_request(data));
