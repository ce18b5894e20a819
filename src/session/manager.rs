//! The session manager: every live session by id, creation through the sandbox, shutdown, and —
//! with a [`SessionStore`] — sessions that outlive a server restart: each is recorded when it
//! starts, forgotten when it ends, let go of (kernel still running) at a graceful shutdown and
//! re-adopted by the next server process.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use tokio::sync::mpsc;

use super::actor::Actor;
use super::fanout::Fanout;
use super::handle::{Session, SessionError, SessionInfo, Status};
use super::metrics::{self as m, StartKind};
use super::pool::Pool;
use super::store::{SessionStore, StoreError, StoredSession};
use super::{Kernel, KernelState, SessionOptions};
use crate::sandbox::{KernelCommand, LaunchSpec, Sandbox, SandboxError};

/// What a client may ask for when creating a session.
#[derive(Debug, Clone, Default)]
pub struct CreateSession {
    /// Network access for the kernel (refused unless the operator allows it).
    pub network: bool,
    /// Extra environment variables for the kernel.
    pub env: BTreeMap<String, String>,
    /// A kernel other than the default one (a kernelspec's image and command).
    pub kernel: KernelCommand,
    /// The kernelspec name clients see (`python3` when empty).
    pub kernel_name: String,
    /// The principal the session belongs to (only it can see and use the session).
    pub owner: Option<Arc<str>>,
    /// Most sessions `owner` may hold at once.
    pub owner_limit: Option<usize>,
    /// Packages to install before the first cell runs (progress as `Install` events with id
    /// [`CREATE_INSTALL_ID`]).
    pub packages: Vec<String>,
}

/// The id of the install a session was created with.
pub const CREATE_INSTALL_ID: &str = "packages";

/// The kernelspec name of sessions that ask for no other.
pub const DEFAULT_KERNEL_NAME: &str = "python3";

/// What [`SessionManager::readiness`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Whether the sandbox backend answers (else why not).
    pub backend: Result<(), String>,
    /// Ready kernels in the warm pool.
    pub pool_ready: usize,
    /// Ready kernels the pool is kept at.
    pub pool_target: usize,
}

impl Readiness {
    /// Ready: the backend answers and the pool is filled (a target of 0 is always filled).
    pub fn is_ready(&self) -> bool {
        self.backend.is_ok() && self.pool_ready >= self.pool_target
    }
}

/// What [`SessionManager::open`] found and did at start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Startup {
    /// Stored sessions whose kernels were re-adopted (they are live again).
    pub adopted: Vec<String>,
    /// Stored sessions that were forgotten, with why (their kernels were gone or not ours).
    pub dropped: Vec<(String, String)>,
    /// Stored sessions kept in the store but not restored because the engine did not answer.
    pub unreachable: Vec<String>,
    /// Kernels a previous run left that no stored session claims, removed by housekeeping.
    pub removed: usize,
}

/// Holds every live session and the sandbox that runs their kernels.
pub struct SessionManager {
    sessions: DashMap<Arc<str>, Arc<Session>>,
    sandbox: Arc<dyn Sandbox>,
    options: SessionOptions,
    /// Started once the manager is ready to give kernels away (after re-adoption and
    /// housekeeping, which would otherwise remove the pool's fresh kernels).
    pool: OnceLock<Arc<Pool>>,
    store: Option<Arc<SessionStore>>,
    /// Slots of sessions being created (see [`SessionManager::reserve`]).
    reserved: Mutex<Reserved>,
}

/// Session slots taken by creations still under way, in all and per owner.
#[derive(Default)]
struct Reserved {
    total: usize,
    by_owner: HashMap<Arc<str>, usize>,
}

/// One reserved session slot; given back when dropped (the session is then in the map, or its
/// creation failed).
struct Slot<'a> {
    manager: &'a SessionManager,
    owner: Option<Arc<str>>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut reserved = self
            .manager
            .reserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reserved.total = reserved.total.saturating_sub(1);
        if let Some(owner) = &self.owner
            && let Some(n) = reserved.by_owner.get_mut(owner)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                reserved.by_owner.remove(owner);
            }
        }
    }
}

impl SessionManager {
    /// A manager that starts kernels with `sandbox` and keeps no record of its sessions: they
    /// end with the server (in-process servers, tests). Does no housekeeping.
    pub fn new(sandbox: Arc<dyn Sandbox>, options: SessionOptions) -> Arc<Self> {
        let manager = Arc::new(Self::bare(sandbox, options, None));
        manager.start_pool();
        manager.start_culling();
        manager
    }

    /// A server's manager: with a `store`, re-adopts the stored sessions whose kernels still
    /// run and forgets the others (with a log line each); then removes every kernel of this
    /// server instance that no live session claims (housekeeping); then starts the warm pool.
    /// Fails only if the store cannot be read.
    pub async fn open(
        sandbox: Arc<dyn Sandbox>,
        options: SessionOptions,
        store: Option<SessionStore>,
    ) -> Result<(Arc<Self>, Startup), StoreError> {
        let manager = Arc::new(Self::bare(sandbox, options, store.map(Arc::new)));
        let mut startup = Startup::default();
        let mut keep = HashSet::new();
        if let Some(store) = &manager.store {
            let (stored, unreadable) = store.list()?;
            for bad in unreadable {
                tracing::warn!(session = %bad.id, reason = %bad.reason, "forgetting an unreadable stored session");
                store.remove(&bad.id)?;
                startup.dropped.push((bad.id, bad.reason));
            }
            for record in stored {
                match manager.adopt(&record).await {
                    Ok(()) => {
                        tracing::info!(session = %record.id, "re-adopted a stored session");
                        keep.insert(record.id.clone());
                        startup.adopted.push(record.id);
                    }
                    Err(err @ SandboxError::Unreachable { .. }) => {
                        tracing::warn!(session = %record.id, error = %err, "cannot re-adopt a stored session now; keeping it for the next start");
                        keep.insert(record.id.clone());
                        startup.unreachable.push(record.id);
                    }
                    Err(err) => {
                        tracing::info!(session = %record.id, reason = %err, "forgetting a stored session: its kernel cannot be taken over");
                        store.remove(&record.id)?;
                        startup.dropped.push((record.id, err.to_string()));
                    }
                }
            }
        }
        match manager.sandbox.cleanup_except(&keep).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(removed = n, "removed kernels a previous run left behind");
                startup.removed = n;
            }
            Err(e) => tracing::warn!(error = %e, "housekeeping failed"),
        }
        manager.start_pool();
        manager.start_culling();
        Ok((manager, startup))
    }

    fn bare(
        sandbox: Arc<dyn Sandbox>,
        options: SessionOptions,
        store: Option<Arc<SessionStore>>,
    ) -> Self {
        Self {
            sessions: DashMap::new(),
            sandbox,
            options,
            pool: OnceLock::new(),
            store,
            reserved: Mutex::new(Reserved::default()),
        }
    }

    fn start_pool(&self) {
        if self.options.pool_size > 0 {
            let _ = self.pool.get_or_init(|| {
                Pool::start(
                    self.options.pool_size,
                    self.sandbox.clone(),
                    self.options.client.clone(),
                )
            });
        }
    }

    /// Starts closing idle sessions, when the options ask for it.
    fn start_culling(self: &Arc<Self>) {
        if let Some(idle) = self.options.cull_idle {
            tokio::spawn(cull_idle_sessions(Arc::downgrade(self), idle));
        }
    }

    /// The sessions the culling rules close now: idle (no cell running or queued, not starting
    /// or restarting) for longer than `idle`, and without a connected client unless
    /// `cull_connected`. Dead kernels count as idle.
    fn cullable(&self, idle: std::time::Duration) -> Vec<Arc<str>> {
        let now = Utc::now();
        self.sessions
            .iter()
            .filter_map(|entry| {
                let info = entry.value().info();
                let quiet =
                    matches!(info.state, KernelState::Idle | KernelState::Dead) && info.queued == 0;
                let alone = self.options.cull_connected || info.connections == 0;
                let since = (now - info.last_activity).to_std().unwrap_or_default();
                (quiet && alone && since >= idle).then(|| info.id.clone())
            })
            .collect()
    }

    /// Takes over a stored session's kernel and starts its actor (which reconnects).
    async fn adopt(&self, record: &StoredSession) -> Result<(), SandboxError> {
        if record.kernel.session_id != record.id {
            return Err(SandboxError::NotAdoptable(format!(
                "the record of session {} describes the kernel of session {}",
                record.id, record.kernel.session_id
            )));
        }
        let process = self.sandbox.adopt(&record.kernel).await?;
        m::kernel_started(StartKind::Adopted);
        let kernel = Kernel {
            id: record.id.as_str().into(),
            process,
            client: None,
            adopted: true,
        };
        self.spawn(
            kernel,
            record.kernel_name.as_str().into(),
            record.owner.as_deref().map(Arc::from),
            record.created,
            record.last_seq,
        );
        Ok(())
    }

    /// Whether sessions are recorded so that they outlive a server restart.
    pub fn persistent(&self) -> bool {
        self.store.is_some()
    }

    /// The sandbox backend's name.
    pub fn backend(&self) -> &'static str {
        self.sandbox.name()
    }

    /// How isolated the backend's kernels are (state names only), for `/healthz`.
    pub fn isolation(&self) -> serde_json::Value {
        self.sandbox.isolation()
    }

    /// Starts a session: launches its kernel and its actor. Returns once the sandbox has
    /// started the kernel; cells sent before the kernel is ready wait in the queue.
    pub async fn create(&self, request: CreateSession) -> Result<Arc<Session>, SessionError> {
        // Held until the session is in the map (or creation failed): concurrent creates see
        // each other's slots, so none can pass the limits while another is still launching.
        let _slot = self.reserve(request.owner.as_ref(), request.owner_limit)?;
        if !request.packages.is_empty() {
            if !self.sandbox.installs_packages() {
                return Err(crate::sandbox::InstallError::Disabled.into());
            }
            crate::sandbox::packages::validate(&request.packages)?;
        }
        // Only plain sessions can take a pooled kernel: the pool's kernels have no network and
        // no extra environment.
        let kernel_name: Arc<str> = if request.kernel_name.is_empty() {
            DEFAULT_KERNEL_NAME.into()
        } else {
            request.kernel_name.as_str().into()
        };
        let plain = !request.network
            && request.env.is_empty()
            && request.kernel == KernelCommand::default();
        let pooled = self.pool.get().filter(|_| plain).and_then(|p| p.take());
        let kernel = match pooled {
            Some(kernel) => kernel,
            None => {
                let id: Arc<str> = uuid::Uuid::new_v4().to_string().into();
                let spec = LaunchSpec {
                    session_id: id.to_string(),
                    network: request.network,
                    env: request.env,
                    kernel: request.kernel,
                };
                let process = self.sandbox.launch(&spec).await?;
                m::kernel_started(StartKind::Cold);
                Kernel {
                    id,
                    process,
                    client: None,
                    adopted: false,
                }
            }
        };
        let created = Utc::now();
        if let Some(store) = &self.store
            && let Some(persisted) = kernel.process.persisted().await
        {
            let record = StoredSession {
                id: kernel.id.to_string(),
                owner: request.owner.as_deref().map(str::to_owned),
                kernel_name: kernel_name.to_string(),
                created,
                last_seq: 0,
                kernel: persisted,
            };
            if let Err(err) = store.insert(&record) {
                // A session that would silently not survive a restart is worse than none.
                if let Err(e) = kernel.process.shutdown().await {
                    tracing::warn!(error = %e, "cannot remove the kernel of an unrecorded session");
                }
                return Err(err.into());
            }
        }
        let session = self.spawn(kernel, kernel_name, request.owner, created, 0);
        if !request.packages.is_empty()
            && let Err(err) =
                session.install_before_cells(CREATE_INSTALL_ID.into(), request.packages)
        {
            // Checked above, so only an overloaded or closed actor gets here: do not leave a
            // session behind that the client was told failed.
            let _ = self.remove(session.id()).await;
            return Err(err);
        }
        Ok(session)
    }

    /// Takes a session slot within the server's and `owner`'s limits, counting live sessions
    /// and the slots of creations still under way (checked and taken under one lock, so
    /// concurrent creates cannot all pass a check before any of them is counted).
    fn reserve(
        &self,
        owner: Option<&Arc<str>>,
        owner_limit: Option<usize>,
    ) -> Result<Slot<'_>, SessionError> {
        let mut reserved = self
            .reserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.sessions.len() + reserved.total >= self.options.max_sessions {
            return Err(SessionError::Limit(format!(
                "the server runs its maximum of {} sessions; close one first",
                self.options.max_sessions
            )));
        }
        if let (Some(owner), Some(limit)) = (owner, owner_limit) {
            let held = self
                .sessions
                .iter()
                .filter(|s| s.value().owner() == Some(owner))
                .count()
                + reserved.by_owner.get(owner).copied().unwrap_or(0);
            if held >= limit {
                return Err(SessionError::Limit(format!(
                    "this token holds its maximum of {limit} sessions; close one first"
                )));
            }
        }
        reserved.total += 1;
        if let Some(owner) = owner {
            *reserved.by_owner.entry(owner.clone()).or_insert(0) += 1;
        }
        Ok(Slot {
            manager: self,
            owner: owner.cloned(),
        })
    }

    fn spawn(
        &self,
        kernel: Kernel,
        kernel_name: Arc<str>,
        owner: Option<Arc<str>>,
        created: DateTime<Utc>,
        last_seq: u64,
    ) -> Arc<Session> {
        let id = kernel.id.clone();
        let now = Utc::now();
        let (commands_tx, commands_rx) = mpsc::channel(self.options.max_queue + 64);
        let fanout = Arc::new(Fanout::new(self.options.replay, last_seq));
        let status = Arc::new(Mutex::new(Status {
            // A pooled kernel is ready already: say so before the actor first runs.
            state: if kernel.client.is_some() {
                KernelState::Idle
            } else {
                KernelState::Starting
            },
            last_activity: now,
            execution_count: 0,
            queued: 0,
        }));
        let session = Arc::new(Session {
            files: kernel.process.files(),
            installs_allowed: self.sandbox.installs_packages(),
            id: id.clone(),
            created,
            kernel_name,
            owner,
            backend: self.sandbox.name(),
            commands: commands_tx,
            fanout: fanout.clone(),
            status: status.clone(),
            queue_budget: super::handle::QueueBudget::new(self.options.max_queued_bytes),
        });
        let actor = Actor::new(
            id.clone(),
            self.options.clone(),
            kernel,
            commands_rx,
            fanout,
            status,
            last_seq,
        );
        let span = tracing::info_span!("session", id = %id);
        tokio::spawn(tracing::Instrument::instrument(Box::new(actor).run(), span));
        self.sessions.insert(id, session.clone());
        session
    }

    /// Ready kernels waiting in the warm pool.
    pub fn pool_ready(&self) -> usize {
        self.pool.get().map_or(0, |p| p.len())
    }

    /// Ready kernels the warm pool is kept at (0: no pool).
    pub fn pool_target(&self) -> usize {
        self.pool.get().map_or(0, |p| p.target())
    }

    /// How many live sessions are in each state, every state listed (zeros included).
    pub fn count_by_state(&self) -> [(KernelState, usize); KernelState::ALL.len()] {
        let mut counts = KernelState::ALL.map(|state| (state, 0));
        for entry in &self.sessions {
            let state = entry.value().state();
            if let Some((_, n)) = counts.iter_mut().find(|(s, _)| *s == state) {
                *n += 1;
            }
        }
        counts
    }

    /// Whether the server can serve new sessions at once: the sandbox backend answers
    /// ([`Sandbox::ready`]) and the warm pool holds its target of ready kernels.
    pub async fn readiness(&self) -> Readiness {
        let backend = match self.sandbox.ready().await {
            Ok(()) => Ok(()),
            Err(err) => {
                tracing::warn!(backend = self.sandbox.name(), error = %err, "readiness: the sandbox backend is not ready");
                Err(err.to_string())
            }
        };
        Readiness {
            backend,
            pool_ready: self.pool_ready(),
            pool_target: self.pool_target(),
        }
    }

    /// The session with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.sessions.get(id).map(|s| s.value().clone())
    }

    /// Every live session's info.
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut list: Vec<SessionInfo> = self.sessions.iter().map(|s| s.value().info()).collect();
        list.sort_by_key(|s| s.created);
        list
    }

    /// Closes a session, removes its kernel and forgets it in the store.
    pub async fn remove(&self, id: &str) -> Result<(), SessionError> {
        let (_, session) = self
            .sessions
            .remove(id)
            .ok_or_else(|| SessionError::NotFound(id.to_owned()))?;
        session.close().await;
        if let Some(store) = &self.store {
            // The kernel is gone whatever the store says; a stale record is dropped at the next
            // start, when its containers are found gone.
            if let Err(err) = store.remove(id) {
                tracing::warn!(session = %id, error = %err, "cannot forget a closed session");
            }
        }
        Ok(())
    }

    /// Closes every session, removes their kernels and what this server instance left behind,
    /// and forgets them in the store (the end of a server that keeps nothing, and of tests).
    pub async fn shutdown(&self) {
        let ids: Vec<Arc<str>> = self.sessions.iter().map(|s| s.key().clone()).collect();
        let closing = ids.iter().map(|id| self.remove(id));
        futures::future::join_all(closing).await;
        if let Some(pool) = self.pool.get() {
            pool.close().await;
        }
        if let Err(e) = self.sandbox.cleanup().await {
            tracing::warn!(error = %e, "sandbox cleanup failed");
        }
    }

    /// The graceful shutdown of a server that keeps its sessions across restarts: every
    /// session's actor stops, its kernel keeps running (and the store remembers where its
    /// events stopped) for the next server process to re-adopt. Warm-pool kernels, which belong
    /// to no session, are removed. Without a store (or for kernels the backend cannot keep) this
    /// is [`shutdown`](Self::shutdown).
    pub async fn detach(&self) {
        let Some(store) = &self.store else {
            self.shutdown().await;
            return;
        };
        let sessions: Vec<Arc<Session>> = self.sessions.iter().map(|s| s.value().clone()).collect();
        futures::future::join_all(sessions.iter().map(|s| s.detach())).await;
        for session in &sessions {
            self.sessions.remove(session.id());
            if let Err(err) = store.set_last_seq(session.id(), session.last_seq()) {
                tracing::warn!(session = %session.id(), error = %err, "cannot record where the session's events stopped");
            }
        }
        if let Some(pool) = self.pool.get() {
            pool.close().await;
        }
    }
}

/// Closes sessions idle for longer than `idle`, checking a few times per period, until the
/// manager is gone.
async fn cull_idle_sessions(manager: std::sync::Weak<SessionManager>, idle: std::time::Duration) {
    let every = (idle / 4).clamp(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(60),
    );
    loop {
        tokio::time::sleep(every).await;
        let Some(manager) = manager.upgrade() else {
            return;
        };
        for id in manager.cullable(idle) {
            tracing::info!(session = %id, idle_s = idle.as_secs(), "culling an idle session");
            if manager.remove(&id).await.is_ok() {
                metrics::counter!(m::SESSIONS_CULLED).increment(1);
            }
        }
    }
}
