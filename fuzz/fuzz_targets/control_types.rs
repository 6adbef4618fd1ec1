//! The control functions' JSON request bodies and answers, as handlers and client read them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_aws::fuzzing::control_types(data));
