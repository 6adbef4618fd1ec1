//! The proxy's HTTP request head parser, framing and target.
#![no_main]

libfuzzer_sys::fuzz_target!(
    |data: &[u8]| fluidity_agent::proxy::fuzzing::fuzz_http_request_head(data)
);
