//! The configuration server's move documents: any bytes give a checked move request or
//! progress report, or a coded error (never a panic); what is accepted is within the
//! server's bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match fbr_enroll::wire::parse_move_request(data) {
        Ok(r) => {
            assert!(fbr_protocol::names::validate_name(&r.vm).is_ok());
            assert!(fbr_protocol::names::validate_name(&r.relay).is_ok());
        }
        Err(e) => assert!((400..500).contains(&e.status())),
    }
    match fbr_enroll::wire::parse_move_progress(data) {
        Ok(p) => assert!(p.bytes_drained <= p.bytes_to_drain),
        Err(e) => assert!((400..500).contains(&e.status())),
    }
});
