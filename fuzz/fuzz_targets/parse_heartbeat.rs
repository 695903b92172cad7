//! The configuration server's heartbeat decoder: any bytes give a checked heartbeat or
//! a coded error (never a panic), and an accepted one is within the server's bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match fbr_enroll::wire::parse_heartbeat(data) {
        Ok(h) => {
            assert!(fbr_enroll::wire::HEARTBEAT_INTERVALS_S.contains(&h.interval_s));
            assert!(h.streams.len() <= fbr_enroll::wire::MAX_STREAMS);
        }
        Err(e) => assert!((400..500).contains(&e.status())),
    }
});
