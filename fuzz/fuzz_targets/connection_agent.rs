//! The agent-side connection fed arbitrary peer bytes and frames with advancing time.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_proto::fuzzing::connection(
    fluidity_proto::Side::Agent,
    data
));
