//! Standbys: a volume at a second site kept at a recent backup of another, by
//! applying each new backup over the last one as it appears. What the standby holds
//! is recorded in the target (`standbys/NAME`), beside the backups it follows: the
//! backup it holds whole, and the one being applied, so an interrupted apply is
//! finished, or undone when the standby is promoted.

use serde::{Deserialize, Serialize};

use crate::error::BackupError;
use crate::target::Target;

/// What a standby holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StandbyState {
    /// The volume whose backups it follows.
    pub source: String,
    /// The backup it holds whole.
    #[serde(default)]
    pub at: Option<String>,
    /// A backup being applied over `at`: until it is done, the standby holds a mix.
    #[serde(default)]
    pub applying: Option<String>,
    /// Promoted to a normal volume: nothing applies backups to it any more.
    #[serde(default)]
    pub promoted: bool,
    /// Seconds since the Unix epoch of the last change.
    #[serde(default)]
    pub updated: u64,
}

impl Target {
    /// The state of standby `name`, if it has one.
    pub async fn standby(&self, name: &str) -> Result<Option<StandbyState>, BackupError> {
        match self
            .get(&self.path(&["standbys", name]), "reading a standby's state")
            .await
        {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                BackupError::Corrupt(format!(
                    "backup target {}: the state of standby {name} is damaged: {e}",
                    self.name()
                ))
            }),
            Err(BackupError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records the state of standby `name`.
    pub async fn set_standby(&self, name: &str, s: &StandbyState) -> Result<(), BackupError> {
        let mut s = s.clone();
        s.updated = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let b = serde_json::to_vec_pretty(&s)
            .map_err(|e| BackupError::Invalid(format!("encoding a standby's state: {e}")))?;
        self.put(
            &self.path(&["standbys", name]),
            b,
            "writing a standby's state",
        )
        .await
    }
}
