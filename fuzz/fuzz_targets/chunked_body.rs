//! The proxy's chunked body decoder, whole and split.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_agent::proxy::fuzzing::fuzz_chunked(data));
