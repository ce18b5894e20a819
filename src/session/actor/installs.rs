//! Package installs in the session actor: one at a time, in a task; creation-time installs
//! hold the cell queue; after one, the next cell is preceded by refreshing import caches.

use super::*;

/// What an install task reports to the actor.
pub(super) enum InstallUpdate {
    Output(Arc<str>, String),
    Done(Arc<str>, Result<(), InstallError>),
}

/// Python run (silently, before the next cell) after an install, so imports see new packages
/// even when the packages dir did not exist when the kernel started.
const REFRESH_IMPORTS: &str = "__import__('importlib').invalidate_caches()";
impl Actor {
    /// After an install, has the kernel refresh its import caches (a silent request nobody
    /// sees) before anything else it is sent; waits for a connected kernel when there is none.
    pub(super) async fn refresh_imports(&mut self) -> Result<(), KernelError> {
        if !self.refresh_imports {
            return Ok(());
        }
        let Some(client) = &self.client else {
            return Ok(());
        };
        let content = json!({
            "code": REFRESH_IMPORTS,
            "silent": true,
            "store_history": false,
            "user_expressions": {},
            "allow_stdin": false,
            "stop_on_error": false,
        });
        let msg_id = client
            .request(Channel::Shell, "execute_request", content, None)
            .await?;
        self.refresh_imports = false;
        self.internal.push_back(msg_id);
        if self.internal.len() > 16 {
            self.internal.pop_front();
        }
        Ok(())
    }

    /// Queues an install; installs run one at a time (they share the packages dir).
    pub(super) fn enqueue_install(&mut self, id: Arc<str>, packages: Vec<String>, blocking: bool) {
        if self.installer.is_none() {
            let message = InstallError::Backend("this backend cannot install packages".into());
            self.emit(
                Some(id.clone()),
                EventKind::Install(InstallEvent::Failed {
                    message: message.to_string(),
                }),
            );
            self.emit(
                Some(id),
                EventKind::Install(InstallEvent::Done {
                    error: Some(message.to_string()),
                }),
            );
            return;
        }
        if blocking {
            self.blocking_installs += 1;
        }
        self.installs.push_back((id, packages, blocking));
        self.start_install();
    }

    /// Starts the next queued install when none runs.
    pub(super) fn start_install(&mut self) {
        if self.install_running.is_some() {
            return;
        }
        let Some(installer) = self.installer.clone() else {
            return;
        };
        let Some((id, packages, blocking)) = self.installs.pop_front() else {
            return;
        };
        self.emit(
            Some(id.clone()),
            EventKind::Install(InstallEvent::Started {
                packages: packages.clone(),
            }),
        );
        let updates = self
            .install_updates
            .get_or_insert_with(|| mpsc::channel(1024))
            .0
            .clone();
        let task_id = id.clone();
        let task = tokio::spawn(async move {
            let (lines_tx, mut lines_rx) = mpsc::channel::<String>(256);
            let install = installer.install(&packages, lines_tx);
            let forward = async {
                while let Some(line) = lines_rx.recv().await {
                    let _ = updates
                        .send(InstallUpdate::Output(task_id.clone(), line))
                        .await;
                }
            };
            let (result, ()) = tokio::join!(install, forward);
            let _ = updates.send(InstallUpdate::Done(task_id, result)).await;
        });
        self.install_running = Some((id, blocking, task));
    }

    pub(super) async fn on_install_update(&mut self, update: InstallUpdate) {
        match update {
            InstallUpdate::Output(id, line) => {
                self.emit(Some(id), EventKind::Install(InstallEvent::Output { line }));
            }
            InstallUpdate::Done(id, result) => {
                if let Some((_, blocking, _)) = self.install_running.take()
                    && blocking
                {
                    self.blocking_installs = self.blocking_installs.saturating_sub(1);
                }
                let error = match result {
                    Ok(()) => {
                        self.refresh_imports = true;
                        // Now, so Jupyter clients' requests see the packages too (the kernel
                        // runs it after the cell it may be running).
                        if let Err(e) = self.refresh_imports().await {
                            tracing::debug!(session = %self.id, error = %e, "cannot refresh import caches");
                        }
                        None
                    }
                    Err(err) => {
                        tracing::info!(session = %self.id, %err, "package install failed");
                        let message = err.to_string();
                        self.emit(
                            Some(id.clone()),
                            EventKind::Install(InstallEvent::Failed {
                                message: message.clone(),
                            }),
                        );
                        Some(message)
                    }
                };
                self.emit(Some(id), EventKind::Install(InstallEvent::Done { error }));
                self.start_install();
            }
        }
    }
}

pub(super) async fn recv_install(
    updates: &mut Option<(mpsc::Sender<InstallUpdate>, mpsc::Receiver<InstallUpdate>)>,
) -> Option<InstallUpdate> {
    match updates.as_mut() {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}
