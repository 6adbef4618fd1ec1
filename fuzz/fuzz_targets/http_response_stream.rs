//! The proxy's reading of an origin's responses from a tunnel stream's chunks, against
//! the same bytes read from one buffer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fluidity_agent::proxy::fuzzing::fuzz_http_response_stream(data)
});
