//! The warm pool: kernels started and proven ready before anyone asks, so creating a session
//! costs a hand-over instead of a kernel start. Refilled in the background, one kernel at a time.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::Kernel;
use crate::kernel::{ClientOptions, KernelClient};
use crate::sandbox::{LaunchSpec, Sandbox};

/// Ready kernels waiting for sessions.
pub(crate) struct Pool {
    target: usize,
    ready: Mutex<VecDeque<Kernel>>,
    wake: Notify,
    closed: std::sync::atomic::AtomicBool,
    refiller: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Pool {
    /// A pool that keeps `target` ready kernels, filled by a background task.
    pub(crate) fn start(
        target: usize,
        sandbox: Arc<dyn Sandbox>,
        client: ClientOptions,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            target,
            ready: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
            refiller: Mutex::new(None),
        });
        let task = tokio::spawn(refill(pool.clone(), sandbox, client));
        if let Ok(mut refiller) = pool.refiller.lock() {
            *refiller = Some(task);
        }
        pool
    }

    /// Ready kernels the pool is kept at.
    pub(crate) fn target(&self) -> usize {
        self.target
    }

    /// Ready kernels now in the pool.
    pub(crate) fn len(&self) -> usize {
        self.ready.lock().map_or(0, |r| r.len())
    }

    /// Takes a ready kernel, if one is waiting and still alive, and asks for a refill.
    pub(crate) fn take(&self) -> Option<Kernel> {
        let kernel = loop {
            let next = self.ready.lock().ok()?.pop_front();
            match next {
                Some(k) if k.client.as_ref().is_some_and(|(c, _)| !c.is_closed()) => break Some(k),
                Some(dead) => {
                    tokio::spawn(async move {
                        let _ = dead.process.shutdown().await;
                    });
                }
                None => break None,
            }
        };
        self.wake.notify_one();
        kernel
    }

    /// Stops refilling (waiting for a kernel being started to be removed) and removes every
    /// pooled kernel.
    pub(crate) async fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
        let task = self.refiller.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
        let kernels: Vec<Kernel> = match self.ready.lock() {
            Ok(mut ready) => ready.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for kernel in kernels {
            let _ = kernel.process.shutdown().await;
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Keeps the pool at its target; backs off when starting kernels fails.
async fn refill(pool: Arc<Pool>, sandbox: Arc<dyn Sandbox>, client: ClientOptions) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if pool.is_closed() {
            return;
        }
        if pool.len() >= pool.target {
            pool.wake.notified().await;
            continue;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let spec = LaunchSpec {
            session_id: id.clone(),
            ..LaunchSpec::default()
        };
        let started = match sandbox.launch(&spec).await {
            Ok(process) => {
                super::metrics::kernel_started(super::metrics::StartKind::Pool);
                match KernelClient::connect(process.connection(), client.clone()).await {
                    Ok(connected) => Ok(Kernel {
                        id: id.into(),
                        process,
                        client: Some(connected),
                        adopted: false,
                    }),
                    Err(e) => {
                        let _ = process.shutdown().await;
                        Err(e.to_string())
                    }
                }
            }
            Err(e) => Err(e.to_string()),
        };
        match started {
            Ok(kernel) => {
                backoff = Duration::from_millis(500);
                if pool.is_closed() {
                    let _ = kernel.process.shutdown().await;
                    return;
                }
                if let Ok(mut ready) = pool.ready.lock() {
                    ready.push_back(kernel);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "warm pool: cannot start a kernel; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
