//! The configuration server's state: one redb database, `state.redb` in the data
//! directory, every change one transaction (so a kill -9 leaves the last committed
//! state).
//!
//! | table | key | value |
//! |---|---|---|
//! | `site` | `"site"` | [`SiteRecord`], JSON |
//! | `components` | component name | [`Component`], JSON |
//! | `failures` | client IP address | `(failed attempts in a row, last failure, UNIX ms)` |
//! | `heartbeats` | component name | [`LastHeartbeat`], JSON |
//! | `placements` | VM name | [`crate::moves::VmPlacementRecord`], JSON (VMs that moved) |
//! | `moves` | move id | [`crate::moves::Move`], JSON |

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const SITE: TableDefinition<&str, &str> = TableDefinition::new("site");
const COMPONENTS: TableDefinition<&str, &str> = TableDefinition::new("components");
const FAILURES: TableDefinition<&str, (u64, u64)> = TableDefinition::new("failures");
const HEARTBEATS: TableDefinition<&str, &str> = TableDefinition::new("heartbeats");
const PLACEMENTS: TableDefinition<&str, &str> = TableDefinition::new("placements");
const MOVES: TableDefinition<u64, &str> = TableDefinition::new("moves");
/// The `site` table's key of the operator token's SHA-256 (hex).
const OPERATOR_TOKEN_KEY: &str = "operator_token_sha256";

/// A component's last heartbeat, as received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastHeartbeat {
    pub received_ms: u64,
    pub report: fbr_enroll::wire::Heartbeat,
}

/// Whether a component reports: `connected` (its last heartbeat is at most
/// [`fbr_enroll::wire::MISSED_HEARTBEATS`] of its intervals old), `disconnected`, or
/// `never` (no heartbeat yet).
pub fn connection_state(last: Option<&LastHeartbeat>, now_ms: u64) -> &'static str {
    match last {
        None => "never",
        Some(h) => {
            let allowed = h.report.interval_s * 1000 * fbr_enroll::wire::MISSED_HEARTBEATS;
            if now_ms.saturating_sub(h.received_ms) <= allowed {
                "connected"
            } else {
                "disconnected"
            }
        }
    }
}

/// File name of the database in the data directory.
pub const STATE_FILE: &str = "state.redb";

/// The site, as `config-server init` made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub version: u32,
    pub site_id: String,
    /// PBKDF2 salt and iterations, and the verifier `K` (hex): never the passphrase.
    pub salt: String,
    pub iterations: u32,
    pub verifier: String,
    pub created_ms: u64,
}

/// An enrolled relay, master target or agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub name: String,
    pub role: String,
    #[serde(default)]
    pub vms: Vec<String>,
    #[serde(default)]
    pub advertise: Option<String>,
    /// SHA-256 of its public key (SubjectPublicKeyInfo), hex: its identity.
    pub key_sha256: String,
    pub enrolled_ms: u64,
    pub last_enrolled_ms: u64,
    pub enrollments: u64,
    /// Agents: the relay it was assigned (its name).
    #[serde(default)]
    pub assigned_relay: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("configuration server state: {0}")]
pub struct StateError(String);

fn e(x: impl std::fmt::Display) -> StateError {
    StateError(x.to_string())
}

/// The open database (locked: one process at a time).
#[derive(Debug)]
pub struct State {
    db: Database,
}

impl State {
    /// Opens (or creates) `state.redb` in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StateError> {
        use std::os::unix::fs::PermissionsExt;
        let private = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .map_err(|x| e(format!("{}: {x}", p.display())))
        };
        std::fs::create_dir_all(data_dir).map_err(|x| e(format!("{}: {x}", data_dir.display())))?;
        // The site's CA key and verifier live here: the daemon's user only.
        private(data_dir, 0o700)?;
        let path = data_dir.join(STATE_FILE);
        let db = Database::create(&path).map_err(|x| match x {
            redb::DatabaseError::DatabaseAlreadyOpen => e(format!(
                "{}: in use by a running config-server (stop it, or ask its API: GET /v1/components, GET /v1/inventory)",
                path.display()
            )),
            x => e(format!("{}: {x}", path.display())),
        })?;
        private(&path, 0o600)?;
        let tx = db.begin_write().map_err(e)?;
        tx.open_table(SITE).map_err(e)?;
        tx.open_table(COMPONENTS).map_err(e)?;
        tx.open_table(FAILURES).map_err(e)?;
        tx.open_table(HEARTBEATS).map_err(e)?;
        tx.open_table(PLACEMENTS).map_err(e)?;
        tx.open_table(MOVES).map_err(e)?;
        tx.commit().map_err(e)?;
        Ok(State { db })
    }

    pub fn site(&self) -> Result<Option<SiteRecord>, StateError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(SITE).map_err(e)?;
        let row = t.get("site").map_err(e)?;
        row.map(|v| serde_json::from_str(v.value()).map_err(e))
            .transpose()
    }

    /// Records the site; refused if there is one.
    pub fn create_site(&self, site: &SiteRecord) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(SITE).map_err(e)?;
            if t.get("site").map_err(e)?.is_some() {
                return Err(StateError(
                    "this data directory already holds a site (config-server init runs once)"
                        .into(),
                ));
            }
            let json = serde_json::to_string(site).map_err(e)?;
            t.insert("site", json.as_str()).map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    pub fn component(&self, name: &str) -> Result<Option<Component>, StateError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(COMPONENTS).map_err(e)?;
        let row = t.get(name).map_err(e)?;
        row.map(|v| serde_json::from_str(v.value()).map_err(e))
            .transpose()
    }

    /// Every row of a table of JSON values keyed by name, in key order.
    fn all_json<V: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &str>,
    ) -> Result<std::collections::BTreeMap<String, V>, StateError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(table).map_err(e)?;
        let mut out = std::collections::BTreeMap::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            out.insert(
                k.value().to_owned(),
                serde_json::from_str(v.value()).map_err(e)?,
            );
        }
        Ok(out)
    }

    /// Every component, by name.
    pub fn components(&self) -> Result<Vec<Component>, StateError> {
        Ok(self.all_json(COMPONENTS)?.into_values().collect())
    }

    /// Records an enrollment (and clears the client address's failures), in one
    /// transaction.
    pub fn record_enrollment(&self, c: &Component, client: &str) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(COMPONENTS).map_err(e)?;
            let json = serde_json::to_string(c).map_err(e)?;
            t.insert(c.name.as_str(), json.as_str()).map_err(e)?;
            tx.open_table(FAILURES)
                .map_err(e)?
                .remove(client)
                .map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    /// Replaces a component's record (its advertised address changed).
    pub fn update_component(&self, c: &Component) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let json = serde_json::to_string(c).map_err(e)?;
            tx.open_table(COMPONENTS)
                .map_err(e)?
                .insert(c.name.as_str(), json.as_str())
                .map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    /// Failed attempts in a row from `client`.
    pub fn failures(&self, client: &str) -> Result<u64, StateError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(FAILURES).map_err(e)?;
        let row = t.get(client).map_err(e)?;
        Ok(row.map_or(0, |v| v.value().0))
    }

    /// Counts one more failure from `client`; returns how many in a row.
    pub fn record_failure(&self, client: &str, now_ms: u64) -> Result<u64, StateError> {
        let tx = self.db.begin_write().map_err(e)?;
        let n;
        {
            let mut t = tx.open_table(FAILURES).map_err(e)?;
            let before = t.get(client).map_err(e)?.map_or(0, |v| v.value().0);
            n = before + 1;
            t.insert(client, (n, now_ms)).map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok(n)
    }

    /// Records a component's heartbeat.
    pub fn record_heartbeat(&self, name: &str, beat: &LastHeartbeat) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let json = serde_json::to_string(beat).map_err(e)?;
            tx.open_table(HEARTBEATS)
                .map_err(e)?
                .insert(name, json.as_str())
                .map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    /// Every component's last heartbeat, by name.
    pub fn heartbeats(
        &self,
    ) -> Result<std::collections::BTreeMap<String, LastHeartbeat>, StateError> {
        self.all_json(HEARTBEATS)
    }

    /// The SHA-256 (hex) of the operator token, if one was made.
    pub fn operator_token_sha256(&self) -> Result<Option<String>, StateError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(SITE).map_err(e)?;
        let row = t.get(OPERATOR_TOKEN_KEY).map_err(e)?;
        Ok(row.map(|v| v.value().to_owned()))
    }

    /// Records the operator token's SHA-256 (hex).
    pub fn set_operator_token_sha256(&self, hex: &str) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(e)?;
        tx.open_table(SITE)
            .map_err(e)?
            .insert(OPERATOR_TOKEN_KEY, hex)
            .map_err(e)?;
        tx.commit().map_err(e)
    }

    /// Every VM that moved, by name.
    pub fn placements(
        &self,
    ) -> Result<std::collections::BTreeMap<String, crate::moves::VmPlacementRecord>, StateError>
    {
        self.all_json(PLACEMENTS)
    }

    /// Every move, oldest first.
    pub fn moves(&self) -> Result<Vec<crate::moves::Move>, StateError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(MOVES).map_err(e)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(e)? {
            let (_, v) = row.map_err(e)?;
            out.push(serde_json::from_str(v.value()).map_err(e)?);
        }
        Ok(out)
    }

    /// Move `id`, if there is one.
    pub fn move_by_id(&self, id: u64) -> Result<Option<crate::moves::Move>, StateError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(MOVES).map_err(e)?;
        let row = t.get(id).map_err(e)?;
        row.map(|v| serde_json::from_str(v.value()).map_err(e))
            .transpose()
    }

    /// The number the next move gets.
    pub fn next_move_id(&self) -> Result<u64, StateError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(MOVES).map_err(e)?;
        let last = t.last().map_err(e)?.map(|(k, _)| k.value());
        Ok(last.map_or(1, |l| l + 1))
    }

    /// Records a move and the VM's placement it leads to, in one transaction (the
    /// placement with `None` leaves it as it is).
    pub fn record_move(
        &self,
        m: &crate::moves::Move,
        placement: Option<&crate::moves::VmPlacementRecord>,
    ) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let json = serde_json::to_string(m).map_err(e)?;
            tx.open_table(MOVES)
                .map_err(e)?
                .insert(m.id, json.as_str())
                .map_err(e)?;
            if let Some(p) = placement {
                let json = serde_json::to_string(p).map_err(e)?;
                tx.open_table(PLACEMENTS)
                    .map_err(e)?
                    .insert(p.vm.as_str(), json.as_str())
                    .map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    /// The site as a whole ([`crate::inventory`]).
    pub fn site_inventory(
        &self,
        now_ms: u64,
    ) -> Result<crate::inventory::SiteInventory, StateError> {
        let mut inventory =
            crate::inventory::site_inventory(&self.components()?, &self.heartbeats()?, now_ms);
        // A VM that moved is where its last move put it.
        let placements = self.placements()?;
        for v in &mut inventory.vms {
            if let Some(p) = placements.get(&v.vm) {
                v.assigned_relay = Some(p.relay.clone());
                v.placement = p.placement;
            }
        }
        Ok(inventory)
    }

    /// The inventory: every component with its connection state and last report.
    pub fn inventory(&self, now_ms: u64) -> Result<Vec<InventoryEntry>, StateError> {
        let beats = self.heartbeats()?;
        Ok(self
            .components()?
            .into_iter()
            .map(|c| {
                let last = beats.get(&c.name).cloned();
                InventoryEntry {
                    state: connection_state(last.as_ref(), now_ms),
                    last_heartbeat_ms: last.as_ref().map(|h| h.received_ms),
                    report: last.map(|h| h.report),
                    component: c,
                }
            })
            .collect())
    }
}

/// One component as the inventory shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InventoryEntry {
    #[serde(flatten)]
    pub component: Component,
    /// `connected`, `disconnected` or `never`.
    pub state: &'static str,
    pub last_heartbeat_ms: Option<u64>,
    pub report: Option<fbr_enroll::wire::Heartbeat>,
}
