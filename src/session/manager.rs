//! The session manager: every live session by id, creation through the sandbox, and shutdown.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use dashmap::DashMap;
use tokio::sync::mpsc;

use super::actor::Actor;
use super::fanout::Fanout;
use super::handle::{Session, SessionError, SessionInfo, Status};
use super::pool::Pool;
use super::{Kernel, KernelState, SessionOptions};
use crate::sandbox::{KernelCommand, LaunchSpec, Sandbox};

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
    /// Packages to install before the first cell runs (progress as `Install` events with id
    /// [`CREATE_INSTALL_ID`]).
    pub packages: Vec<String>,
}

/// The id of the install a session was created with.
pub const CREATE_INSTALL_ID: &str = "packages";

/// The kernelspec name of sessions that ask for no other.
pub const DEFAULT_KERNEL_NAME: &str = "python3";

/// Holds every live session and the sandbox that runs their kernels.
pub struct SessionManager {
    sessions: DashMap<Arc<str>, Arc<Session>>,
    sandbox: Arc<dyn Sandbox>,
    options: SessionOptions,
    pool: Option<Arc<Pool>>,
}

impl SessionManager {
    /// A manager that starts kernels with `sandbox`.
    pub fn new(sandbox: Arc<dyn Sandbox>, options: SessionOptions) -> Arc<Self> {
        let pool = (options.pool_size > 0)
            .then(|| Pool::start(options.pool_size, sandbox.clone(), options.client.clone()));
        Arc::new(Self {
            sessions: DashMap::new(),
            sandbox,
            options,
            pool,
        })
    }

    /// The sandbox backend's name.
    pub fn backend(&self) -> &'static str {
        self.sandbox.name()
    }

    /// Starts a session: launches its kernel and its actor. Returns once the sandbox has
    /// started the kernel; cells sent before the kernel is ready wait in the queue.
    pub async fn create(&self, request: CreateSession) -> Result<Arc<Session>, SessionError> {
        if self.sessions.len() >= self.options.max_sessions {
            return Err(SessionError::Limit(format!(
                "the server runs its maximum of {} sessions; close one first",
                self.options.max_sessions
            )));
        }
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
        let pooled = self.pool.as_ref().filter(|_| plain).and_then(|p| p.take());
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
                Kernel {
                    id,
                    process,
                    client: None,
                }
            }
        };
        let session = self.spawn(kernel, kernel_name);
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

    fn spawn(&self, kernel: Kernel, kernel_name: Arc<str>) -> Arc<Session> {
        let id = kernel.id.clone();
        let now = Utc::now();
        let (commands_tx, commands_rx) = mpsc::channel(self.options.max_queue + 64);
        let fanout = Arc::new(Fanout::new(
            self.options.subscriber_capacity,
            self.options.replay,
        ));
        let status = Arc::new(Mutex::new(Status {
            state: KernelState::Starting,
            last_activity: now,
            execution_count: 0,
            queued: 0,
        }));
        let session = Arc::new(Session {
            files: kernel.process.files(),
            installs_allowed: self.sandbox.installs_packages(),
            id: id.clone(),
            created: now,
            kernel_name,
            backend: self.sandbox.name(),
            commands: commands_tx,
            fanout: fanout.clone(),
            status: status.clone(),
        });
        let actor = Actor::new(
            id.clone(),
            self.options.clone(),
            kernel,
            commands_rx,
            fanout,
            status,
        );
        let span = tracing::info_span!("session", id = %id);
        tokio::spawn(tracing::Instrument::instrument(actor.run(), span));
        self.sessions.insert(id, session.clone());
        session
    }

    /// Ready kernels waiting in the warm pool.
    pub fn pool_ready(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.len())
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

    /// Closes a session and removes its kernel.
    pub async fn remove(&self, id: &str) -> Result<(), SessionError> {
        let (_, session) = self
            .sessions
            .remove(id)
            .ok_or_else(|| SessionError::NotFound(id.to_owned()))?;
        session.close().await;
        Ok(())
    }

    /// Closes every session (graceful shutdown).
    pub async fn shutdown(&self) {
        let ids: Vec<Arc<str>> = self.sessions.iter().map(|s| s.key().clone()).collect();
        let closing = ids.iter().map(|id| self.remove(id));
        futures::future::join_all(closing).await;
        if let Some(pool) = &self.pool {
            pool.close().await;
        }
        if let Err(e) = self.sandbox.cleanup().await {
            tracing::warn!(error = %e, "sandbox cleanup failed");
        }
    }
}
