//! The configuration server's enrollment request decoder: any bytes give a checked
//! request or a coded error (never a panic), and an accepted request is within every
//! bound the server relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match fbr_enroll::wire::parse_enroll_request(data) {
        Ok(checked) => {
            let r = &checked.request;
            assert!(data.len() <= fbr_enroll::wire::MAX_BODY);
            assert!(r.csr_pem.len() <= fbr_enroll::wire::MAX_CSR);
            assert!(r.vms.len() <= fbr_enroll::wire::MAX_LIST);
            assert_eq!(r.version, fbr_enroll::wire::API_VERSION);
        }
        Err(e) => {
            assert!(!e.error.code.is_empty());
            assert!((400..500).contains(&e.status()));
        }
    }
});
