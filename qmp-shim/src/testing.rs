//! An in-memory [`Backend`] for unit-testing the QMP layer (tests only).

use std::path::Path;

use serde_json::json;

use crate::backend::*;
use crate::qmp::events::EventSink;

#[derive(Debug)]
pub struct FakeBackend {
    pub state: RunState,
    pub events: EventSink,
    pub migration: MigrationInfo,
    pub last_params: Option<MigrationParameters>,
    /// The balloon the guest would have: the target and interval set land
    /// here.
    pub balloon: ferry_vmm::devices::virtio::balloon::BalloonInfo,
}

impl FakeBackend {
    pub fn new(events: EventSink) -> Self {
        Self {
            state: RunState::Prelaunch,
            events,
            migration: MigrationInfo::default(),
            last_params: None,
            balloon: Default::default(),
        }
    }
}

impl Backend for FakeBackend {
    fn create(&mut self, _: &MachineConfig) -> Result<(), BackendError> {
        self.state = RunState::Prelaunch;
        Ok(())
    }
    fn cont(&mut self) -> Result<(), BackendError> {
        self.state = RunState::Running;
        self.events.emit("RESUME", None);
        Ok(())
    }
    fn stop(&mut self) -> Result<(), BackendError> {
        self.state = RunState::Paused;
        self.events.emit("STOP", None);
        Ok(())
    }
    fn status(&self) -> RunState {
        self.state
    }
    fn quit(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn system_reset(&mut self) -> Result<(), BackendError> {
        self.events.emit(
            "RESET",
            Some(json!({"guest": false, "reason": "host-qmp-system-reset"})),
        );
        Ok(())
    }
    fn system_powerdown(&mut self) -> Result<(), BackendError> {
        self.events.emit("POWERDOWN", None);
        Ok(())
    }
    fn pmemsave(&mut self, _: u64, size: u64, path: &Path) -> Result<(), BackendError> {
        let len = usize::try_from(size).map_err(|e| BackendError::Engine(e.to_string()))?;
        std::fs::write(path, vec![0u8; len]).map_err(|e| BackendError::Engine(e.to_string()))
    }
    fn migrate(
        &mut self,
        _: MigrationTarget,
        _: &MigrationParameters,
        caps: &MigrationCapabilities,
    ) -> Result<(), BackendError> {
        for s in ["setup", "active"] {
            self.events.emit("MIGRATION", Some(json!({"status": s})));
        }
        self.state = RunState::Paused;
        self.events.emit("STOP", None);
        let status = if caps.pause_before_switchover {
            MigrationStatus::PreSwitchover
        } else {
            MigrationStatus::Completed
        };
        self.events
            .emit("MIGRATION", Some(json!({"status": status.as_str()})));
        self.migration.status = Some(status);
        Ok(())
    }
    fn migrate_incoming(
        &mut self,
        _: MigrationTarget,
        _: &MigrationCapabilities,
    ) -> Result<(), BackendError> {
        self.migration.status = Some(MigrationStatus::Setup);
        self.events
            .emit("MIGRATION", Some(json!({"status": "setup"})));
        Ok(())
    }
    fn migrate_cancel(&mut self) -> Result<(), BackendError> {
        self.migration.status = Some(MigrationStatus::Cancelled);
        Ok(())
    }
    fn migrate_continue(&mut self, state: MigrationStatus) -> Result<(), BackendError> {
        if self.migration.status != Some(state) {
            return Err(BackendError::Migration(format!(
                "Migration not in expected state: {}",
                state.as_str()
            )));
        }
        self.migration.status = Some(MigrationStatus::Completed);
        self.events
            .emit("MIGRATION", Some(json!({"status": "completed"})));
        Ok(())
    }
    fn query_migrate(&self) -> MigrationInfo {
        self.migration.clone()
    }
    fn set_migrate_parameters(&mut self, p: &MigrationParameters) -> Result<(), BackendError> {
        self.last_params = Some(*p);
        Ok(())
    }
    fn save(&mut self, _: MigrationTarget) -> Result<(), BackendError> {
        Ok(())
    }
    fn balloon_info(
        &self,
    ) -> Result<ferry_vmm::devices::virtio::balloon::BalloonInfo, BackendError> {
        Ok(self.balloon.clone())
    }
    fn set_balloon_target(&mut self, pages: u64) -> Result<(), BackendError> {
        self.balloon.num_pages =
            u32::try_from(pages).map_err(|e| BackendError::Engine(e.to_string()))?;
        Ok(())
    }
    fn set_balloon_stats_interval(&mut self, secs: u32) -> Result<(), BackendError> {
        self.balloon.poll_interval = secs;
        Ok(())
    }
}
