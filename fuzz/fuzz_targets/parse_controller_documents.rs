//! The failback controller's documents: a master target's control request (what a
//! relay sends in a `Control` frame), the master target's answer as the relay reads it,
//! and the relay API's job and estimate requests. Any bytes give a document or a clear
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match fbr_controller::target::parse_request(data) {
        Ok(r) => {
            // What is accepted encodes again, and decodes to itself.
            let again = serde_json::to_vec(&r).expect("a request encodes");
            assert_eq!(fbr_controller::target::parse_request(&again), Ok(r));
        }
        Err(e) => assert!(!e.is_empty()),
    }
    let _ = serde_json::from_slice::<fbr_controller::target::Answer>(data);
    if let Err((status, e)) = fbr_relay::api::decode::<fbr_relay::api::JobPost>(data, "a job request") {
        assert!(status.is_client_error(), "{status}");
        assert!(!e.error.message.is_empty());
    }
    if let Err((status, _)) =
        fbr_relay::api::decode::<fbr_relay::api::EstimatePost>(data, "an estimate request")
    {
        assert!(status.is_client_error(), "{status}");
    }
});
