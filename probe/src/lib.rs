//! `lmc-probe` (being written).
#![deny(missing_docs)]

use std::path::Path;

use lmc_train::artifact::Header;

/// JSON summary of an artifact of this crate's kind, for `lmc inspect`.
pub fn inspect_summary(path: &Path, header: &Header, payload: &[u8]) -> lmc_train::Result<serde_json::Value> {
    let _ = (path, header, payload);
    Ok(serde_json::json!({"note": "not implemented yet"}))
}
