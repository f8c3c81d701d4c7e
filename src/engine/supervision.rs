//! Faults inside an engine step are contained at the step boundary: a panic or a model error fails
//! the requests that were in the step, their blocks return to the pool, and the loop goes on. Only
//! `MAX_CONSECUTIVE_FAULTS` failures in a row stop the engine (the server then reports 503 and exits).

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::{EngineCore, RequestId};
use crate::engine::EngineError;

/// How `EngineCore::run` ended.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::engine) enum Ended {
    /// The handle is gone and every request finished.
    Drained,
    /// Steps kept failing: the engine cannot go on.
    Failed,
}

/// Faults in a row after which the engine is taken to be broken (a bad device, a corrupted cache)
/// rather than unlucky with one batch.
const MAX_CONSECUTIVE_FAULTS: u32 = 3;

/// What one step came to when it did not panic.
pub(super) enum StepOutcome {
    Done,
    /// The model failed (an error, not a panic): the step's requests fail as after a panic.
    Faulted(String),
}

impl EngineCore {
    /// One step with its faults contained: a panic or model error inside fails the requests that were
    /// in the step (their blocks return to the pool) and the loop goes on. False once
    /// `MAX_CONSECUTIVE_FAULTS` steps in a row failed.
    pub(super) fn supervised_step(&mut self) -> bool {
        self.step_requests.clear();
        let fault = match catch_unwind(AssertUnwindSafe(|| self.step())) {
            Ok(StepOutcome::Done) => {
                self.consecutive_faults = 0;
                return true;
            }
            Ok(StepOutcome::Faulted(error)) => error,
            Err(payload) => format!("panic: {}", panic_text(payload.as_ref())),
        };
        self.consecutive_faults += 1;
        tracing::error!(
            requests = self.step_requests.len(),
            consecutive = self.consecutive_faults,
            "engine step failed, failing its requests: {fault}"
        );
        for id in std::mem::take(&mut self.step_requests) {
            self.fail_request(id, &fault);
        }
        self.consecutive_faults < MAX_CONSECUTIVE_FAULTS
    }

    pub(super) fn fail_request(&mut self, id: RequestId, why: &str) {
        if let Some(req) = self.requests.get(&id) {
            let _ = req.events.send(Err(EngineError::Model(why.to_owned())));
        }
        self.finish_request(id);
    }

    pub(super) fn fail_all(&mut self, why: &str) {
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        for id in ids {
            self.fail_request(id, why);
        }
    }
}

/// The message of a panic payload (`panic!` gives a `&str` or a `String`).
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".to_owned())
}
