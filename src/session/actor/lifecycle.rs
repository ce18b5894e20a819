//! The kernel's lifecycle in the session actor: connecting, interrupts, restarts, deaths
//! (the sandbox's exit, a lost heartbeat, a wire fault) and deadlines.

use futures::FutureExt;

use super::*;

impl Actor {
    pub(super) fn start_connecting(&mut self) {
        self.connect_with(self.opts.client.clone());
    }

    pub(super) fn connect_with(&mut self, opts: crate::kernel::ClientOptions) {
        if let Some(files) = self.files.as_mut() {
            files.kernel_replaced();
        }
        let info = self.process.connection().clone();
        self.connecting = Some(Box::pin(
            async move { KernelClient::connect(&info, opts).await },
        ));
    }

    pub(super) fn on_connected(
        &mut self,
        result: Result<(KernelClient, mpsc::Receiver<Incoming>), KernelError>,
    ) {
        self.connecting = None;
        match result {
            Ok((client, incoming)) => {
                self.client = Some(client);
                self.incoming = Some(incoming);
                self.set_state(KernelState::Idle, None);
            }
            Err(e) => {
                tracing::warn!(session = %self.id, error = %e, "kernel did not become ready");
                m::kernel_died(match e {
                    KernelError::Wire(_) => Death::WireFault,
                    _ => Death::NotReady,
                });
                self.watching_exit = false;
                self.set_state(KernelState::Dead, Some(e.to_string()));
                self.abort_all("aborted");
            }
        }
    }

    pub(super) async fn interrupt(&mut self) {
        let Some(client) = &self.client else {
            self.reject(None, "the kernel is not running".into());
            return;
        };
        if client
            .request(Channel::Control, "interrupt_request", json!({}), None)
            .await
            .is_err()
        {
            self.signal_interrupt().await;
            return;
        }
        self.interrupt_deadline = Some(Instant::now() + self.opts.interrupt_grace);
    }

    pub(super) async fn signal_interrupt(&mut self) {
        self.interrupt_deadline = None;
        if let Err(e) = self.process.signal_interrupt().await {
            tracing::warn!(session = %self.id, error = %e, "SIGINT fallback failed");
        }
    }

    /// Restarts the kernel (`why`: what its end is counted as, unless it was dead already).
    pub(super) async fn restart(&mut self, why: Death) {
        if self.state != KernelState::Dead {
            m::kernel_died(why);
        }
        self.set_state(KernelState::Restarting, None);
        self.abort_all("aborted");
        self.client = None;
        self.incoming = None;
        self.connecting = None;
        self.interrupt_deadline = None;
        self.unresponsive = None;
        match self.process.restart().await {
            Ok(()) => {
                m::kernel_started(StartKind::Restart);
                self.watching_exit = true;
                self.start_connecting();
            }
            Err(e) => {
                tracing::warn!(session = %self.id, error = %e, "kernel restart failed");
                m::kernel_died(Death::RestartFailed);
                self.watching_exit = false;
                self.set_state(KernelState::Dead, Some(e.to_string()));
                self.flush_forwards().await;
            }
        }
    }

    /// The heartbeat stopped answering. That alone is no proof of death (a GC pause, a stopped
    /// or CPU-starved process): the kernel is declared dead if its process is gone, or if it
    /// does not answer on control either and the sandbox cannot tell whether it runs; it is
    /// kept (state and all) while its process is there.
    pub(super) async fn on_heartbeat_lost(&mut self) {
        let alive = self.process.is_alive().await;
        // Its connections closed and the sandbox cannot say it runs: nothing left to ask.
        let closed = self.client.as_ref().is_none_or(KernelClient::is_closed);
        if alive == Some(false) || (alive.is_none() && closed) {
            self.on_death(ExitReason::HeartbeatLost);
            return;
        }
        tracing::warn!(session = %self.id, "kernel heartbeat lost; its process is alive: asking it on control");
        let now = Instant::now();
        self.unresponsive = Some(Unresponsive {
            since: now,
            probe: None,
            recheck: now,
            announced: false,
        });
        self.probe_control(now);
    }

    /// Sends a control `kernel_info_request` to a kernel that went silent; rechecks later.
    fn probe_control(&mut self, now: Instant) {
        let wait = self.probe_wait();
        let probe = match &self.client {
            Some(client) => client
                .request(Channel::Control, "kernel_info_request", json!({}), None)
                .now_or_never()
                .and_then(Result::ok),
            None => None,
        };
        if let Some(id) = &probe {
            // Its iopub busy/idle are nobody's business.
            self.internal.push_back(id.clone());
            if self.internal.len() > 16 {
                self.internal.pop_front();
            }
        }
        if let Some(u) = self.unresponsive.as_mut() {
            u.probe = probe.or(u.probe.take());
            u.recheck = now + wait;
        }
    }

    /// How long a silent kernel is given to answer a control probe: as long as the heartbeat
    /// took to give up on it, at least a second.
    fn probe_wait(&self) -> Duration {
        let client = &self.opts.client;
        (client.heartbeat_interval * client.heartbeat_misses.max(1)).max(Duration::from_secs(1))
    }

    /// A silent kernel's probe went unanswered: dead if its process is gone or cannot be
    /// checked, else announced (once) as unresponsive, kept, and asked again.
    async fn recheck_unresponsive(&mut self, now: Instant) {
        if self.process.is_alive().await != Some(true) {
            self.on_death(ExitReason::HeartbeatLost);
            return;
        }
        let Some(u) = self.unresponsive.as_mut() else {
            return;
        };
        if !u.announced {
            u.announced = true;
            let silent = u.since.elapsed().as_secs_f64();
            let reason = format!(
                "unresponsive: no heartbeat or control answer for {silent:.1} s; its process is                  alive, so it is kept"
            );
            tracing::warn!(session = %self.id, "{reason}");
            self.set_state(self.state, Some(reason));
        }
        self.probe_control(now);
    }

    /// A kernel that went silent answered its control probe: it is alive and kept.
    pub(super) fn kernel_answered(&mut self) {
        let Some(u) = self.unresponsive.take() else {
            return;
        };
        let silent = u.since.elapsed().as_secs_f64();
        tracing::info!(session = %self.id, silent_s = silent, "kernel answers again");
        if u.announced {
            let reason = format!("recovered: the kernel answers again after {silent:.1} s");
            self.set_state(self.state, Some(reason));
        }
    }

    pub(super) fn on_death(&mut self, reason: ExitReason) {
        self.kernel_lost(Death::from(&reason), reason.to_string());
    }

    /// The kernel is gone (or no longer trusted): drops its client (every connection, and
    /// whatever it still had queued), reports it dead with `reason`, aborts what waited on it.
    /// The process stays until a restart or close replaces it.
    pub(super) fn kernel_lost(&mut self, death: Death, reason: String) {
        tracing::info!(session = %self.id, %reason, "kernel died");
        m::kernel_died(death);
        self.watching_exit = false;
        self.client = None;
        self.incoming = None;
        self.connecting = None;
        self.interrupt_deadline = None;
        self.unresponsive = None;
        // The death first, then the cells it aborted: clients learn the cause before the effect.
        self.set_state(KernelState::Dead, Some(reason));
        self.abort_all("aborted");
        for (_, msg, origin, _) in std::mem::take(&mut self.forwards) {
            let what = format!("the kernel died: {} was not sent", msg.msg_type());
            self.reject(Some(origin), what);
        }
        for (msg_type, _, query) in std::mem::take(&mut self.pending_queries) {
            self.reject(
                Some(query.id),
                format!("the kernel died: {msg_type} was not sent"),
            );
        }
    }

    pub(super) async fn on_deadline(&mut self) {
        let now = Instant::now();
        if self.unresponsive.as_ref().is_some_and(|u| u.recheck <= now) {
            self.recheck_unresponsive(now).await;
        }
        if let Some(r) = self.running.as_mut()
            && r.idle_wait.is_some_and(|d| d <= now)
            && !r.idle
        {
            // iopub lost the cell's idle: its reply came, so the kernel is done with it.
            r.idle_wait = None;
            r.idle = true;
            r.idle_lost = true;
            self.finish_if_done();
        }
        if self.interrupt_deadline.is_some_and(|d| d <= now) {
            self.signal_interrupt().await;
        }
        let grace = self.opts.timeout_restart_grace;
        let timed_out = match self.running.as_mut() {
            Some(r) if r.deadline.is_some_and(|d| d <= now) => {
                r.deadline = None;
                r.timed_out = true;
                r.restart_at = Some(now + grace);
                Some((r.cell.clone(), r.started.elapsed()))
            }
            _ => None,
        };
        if let Some((cell, ran)) = timed_out {
            self.emit(
                Some(cell),
                EventKind::Limit {
                    limit: "CellTimeout",
                    message: format!(
                        "the cell ran past its time limit ({:.1} s): interrupting it",
                        ran.as_secs_f64()
                    ),
                },
            );
            self.interrupt().await;
        }
        let stuck = self
            .running
            .as_ref()
            .is_some_and(|r| r.restart_at.is_some_and(|d| d <= now));
        if stuck && let Some(r) = self.running.take() {
            self.emit(
                Some(r.cell.clone()),
                EventKind::Limit {
                    limit: "CellTimeout",
                    message: format!(
                        "the cell did not stop within {:.1} s of its interrupt: restarting the \
                         kernel (variables are lost)",
                        grace.as_secs_f64()
                    ),
                },
            );
            let duration_ms = self.cell_finished(&r.span, r.started, "timeout");
            self.emit(
                Some(r.cell),
                EventKind::Done {
                    status: "timeout",
                    execution_count: None,
                    duration_ms,
                    files: None,
                    idle_lost: false,
                },
            );
            self.restart(Death::TimeoutRestart).await;
        }
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        [
            self.running.as_ref().and_then(|r| r.deadline),
            self.running.as_ref().and_then(|r| r.restart_at),
            self.running
                .as_ref()
                .and_then(|r| r.idle_wait.filter(|_| !r.idle)),
            self.interrupt_deadline,
            self.unresponsive.as_ref().map(|u| u.recheck),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
