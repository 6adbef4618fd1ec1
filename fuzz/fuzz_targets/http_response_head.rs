//! The proxy's HTTP response head parser and framing.
#![no_main]

libfuzzer_sys::fuzz_target!(
    |data: &[u8]| fluidity_agent::proxy::fuzzing::fuzz_http_response_head(data)
);
