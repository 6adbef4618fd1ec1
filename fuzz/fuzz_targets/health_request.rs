//! The server's `/healthz` and `/metrics` endpoint, fed over a socket on 127.0.0.1: every
//! answer is one of its own, whole.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fluidity_server::health::fuzzing::health_request(data);
});
