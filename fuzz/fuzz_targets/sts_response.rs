//! STS answers: the XML reader, caller identity and error documents.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_aws::fuzzing::sts_response(data));
