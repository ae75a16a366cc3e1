//! The job-progress example: background jobs push their progress to the
//! browser of the user who started them, on the warp adapter.
//!
//! A person signs in (a demo login: `POST /api/login {"user"}` answers a JWT
//! signed by the runtime's [`JwtAuthenticator`]), starts jobs (`POST
//! /api/jobs` with the JWT as bearer), and watches each one's progress bar
//! move. A background task per job publishes to the room `job_{id}`, through
//! [`Switchboard::publish`]:
//!
//! | event | data |
//! |---|---|
//! | `job_progress` | `{"id", "progress": 10, "current_step": "starting"}`, then 30 `working`, 90 `uploading`, 100 `done` |
//! | `job_completed` | `{"id", "progress": 100, "result": {"file", "rows"}}` |
//! | `job_error` | `{"id", "progress", "current_step", "error"}` (a job started with `"fail": true` fails while uploading) |
//!
//! The rules are a [`Policy`]: a `job_{id}` room may be joined only by the
//! job's owner, only the server publishes ([`PublishRule::ServerOnly`]), and
//! the room keeps its last [`HISTORY`] events, so a page that reconnects gets
//! what it missed through `since`. No other room exists.
//!
//! The policy looks the owner up in the app's own job store (the same map the
//! status endpoint reads) rather than reading it out of the room name
//! (`job_{owner}_{n}`): the job's record is the one source of truth for who
//! owns it, job ids say nothing about users, and user names need not fit the
//! room-name alphabet. The lookup is one read-locked hash lookup, cheap enough
//! for the core's synchronous policy call. A job is in the store before its id
//! is returned to anyone, so its owner can always join.
//!
//! `GET /api/jobs/{id}/status` (bearer JWT, owner only) serves clients that
//! only poll: state, progress, current step, result or error, and the room
//! position (`seq`, `epoch`) of the last event that state reflects (the worker
//! publishes and records under one per-job lock, so the two always agree). The
//! page uses it when it first follows a job, and when `since` cannot recover
//! (`joined` with `recovered: false`, e.g. after a server restart).
//!
//! With [`Options::state_file`] the jobs survive a restart (a product keeps
//! them in its database): unfinished jobs resume from their last step. The
//! rooms' history does not survive (it lives in the Switchboard), so pages
//! that were following see `recovered: false` and reload from the status
//! endpoint.
//!
//! Routes: `/` (the page), `/jobs.js`, `/jobs.css`, `POST /api/login`, `POST
//! /api/jobs`, `GET /api/jobs`, `GET /api/jobs/{id}/status`, the transports
//! chosen in [`Options::transports`] (`/ws`, `/sse`, `/poll`), `/switchboard.js`
//! and `/metrics`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use switchboard_examples::jobs;
//! let app = jobs::App::new(jobs::Options::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8081").await?;
//! let sb = app.switchboard().clone();
//! tokio::spawn(async move {
//!     tokio::signal::ctrl_c().await.ok();
//!     sb.shutdown().await; // ends `serve`
//! });
//! jobs::serve(listener, app).await;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use switchboard_core::{Config, Identity, Policy, PublishRule, RoomName, RoomOptions, Target};
use switchboard_runtime::{AllowOrigins, JwtAuthenticator, Switchboard};
use warp::filters::BoxedFilter;
use warp::Filter;

/// The page.
pub const INDEX_HTML: &str = include_str!("../jobs/index.html");
/// The page's script (an ES module that imports `/switchboard.js`).
pub const JOBS_JS: &str = include_str!("../jobs/jobs.js");
/// The page's style sheet.
pub const JOBS_CSS: &str = include_str!("../jobs/jobs.css");

/// Events a job room keeps for recovery: every event of a job fits.
pub const HISTORY: usize = 16;
/// How long a demo sign-in lasts.
pub const TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// The pause between two steps of a job, by default.
pub const DEFAULT_STEP: Duration = Duration::from_millis(1500);
/// Unfinished jobs one user may have at once.
pub const MAX_RUNNING_PER_USER: usize = 20;
/// Jobs the store holds at most (a demo keeps them in memory).
pub const MAX_JOBS: usize = 10_000;

/// The steps of every job: progress in percent, and `current_step`.
pub const STEPS: [(u8, &str); 4] = [
    (10, "starting"),
    (30, "working"),
    (90, "uploading"),
    (100, "done"),
];
/// The step at which a job started with `"fail": true` fails.
pub const FAILING_STEP: &str = "uploading";
/// The first wait before a publish that failed for now (`unavailable`: a
/// cluster broker out of reach) is tried again; it doubles up to
/// [`PUBLISH_RETRY_MAX`].
pub const PUBLISH_RETRY_FIRST: Duration = Duration::from_millis(200);
/// The longest wait between two tries of a publish.
pub const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(5);

/// Which transports the server offers. Refusing some shows the browser
/// client's fallback (WebSocket, then SSE, then long-poll).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transports {
    /// `GET /ws`.
    pub websocket: bool,
    /// `GET /sse`, `POST /sse/send`.
    pub sse: bool,
    /// `POST /poll/open`, `GET /poll`, `POST /poll/send`.
    pub longpoll: bool,
}

impl Transports {
    /// All three.
    pub const ALL: Self = Self {
        websocket: true,
        sse: true,
        longpoll: true,
    };
}

impl Default for Transports {
    fn default() -> Self {
        Self::ALL
    }
}

impl FromStr for Transports {
    type Err = String;

    /// A comma-separated list of `websocket` (or `ws`), `sse`, `longpoll`
    /// (or `poll`).
    fn from_str(text: &str) -> Result<Self, String> {
        let mut chosen = Self {
            websocket: false,
            sse: false,
            longpoll: false,
        };
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "websocket" | "ws" => chosen.websocket = true,
                "sse" => chosen.sse = true,
                "longpoll" | "poll" => chosen.longpoll = true,
                other => {
                    return Err(format!(
                        "unknown transport `{other}` (use websocket, sse, longpoll)"
                    ))
                }
            }
        }
        if chosen
            == (Self {
                websocket: false,
                sse: false,
                longpoll: false,
            })
        {
            return Err("name at least one transport".into());
        }
        Ok(chosen)
    }
}

/// How the app runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// The transports mounted (default: all).
    pub transports: Transports,
    /// The pause between two steps of a job (default [`DEFAULT_STEP`]).
    pub step: Duration,
    /// The HS256 secret that signs sign-in tokens; `None` draws a random one,
    /// so tokens die with the process.
    pub secret: Option<Vec<u8>>,
    /// Where jobs are kept across restarts (a JSON file); `None` keeps them in
    /// memory only.
    pub state_file: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            transports: Transports::ALL,
            step: DEFAULT_STEP,
            secret: None,
            state_file: None,
        }
    }
}

impl Options {
    /// Mounts only these transports.
    #[must_use]
    pub fn transports(mut self, transports: Transports) -> Self {
        self.transports = transports;
        self
    }

    /// Pauses `step` between two steps of a job.
    #[must_use]
    pub fn step(mut self, step: Duration) -> Self {
        self.step = step;
        self
    }

    /// Signs tokens with `secret`.
    #[must_use]
    pub fn secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// Keeps jobs in `path` across restarts.
    #[must_use]
    pub fn state_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.state_file = Some(path.into());
        self
    }
}

/// Why the app could not start.
#[derive(Debug)]
pub enum StartError {
    /// The OS had no randomness for the secret.
    Random(getrandom::Error),
    /// The Switchboard could not be built.
    Build(switchboard_runtime::BuildError),
    /// The state file exists but cannot be read.
    State(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Random(e) => write!(f, "no randomness for the signing secret: {e}"),
            Self::Build(e) => write!(f, "cannot build the switchboard: {e}"),
            Self::State(e) => write!(f, "cannot load the jobs: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Created, no step taken yet.
    Queued,
    /// Between its first and last step.
    Running,
    /// Done, with a result.
    Completed,
    /// Failed, with an error.
    Failed,
}

impl JobState {
    /// Completed or failed: nothing more will happen.
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

/// A job, as the store keeps it and the status endpoint shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// Random, URL- and room-safe.
    pub id: String,
    /// The user who started it: the only one who may follow it.
    pub owner: String,
    /// What the user called it.
    pub name: String,
    /// Whether it is meant to fail (a demo of `job_error`).
    pub fail: bool,
    /// Where it is.
    pub state: JobState,
    /// Percent.
    pub progress: u8,
    /// The step it is at (`queued` before the first).
    pub current_step: String,
    /// How many of [`STEPS`] are done.
    pub steps_done: usize,
    /// When each step was reached (Unix milliseconds), by `current_step`.
    #[serde(default)]
    pub reached: BTreeMap<String, u64>,
    /// What it produced, once completed.
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    pub error: Option<String>,
    /// The `seq` of the last event published for it (0: none yet).
    pub seq: u64,
    /// The room epoch of that event.
    pub epoch: Option<String>,
    /// Unix milliseconds.
    pub created_at: u64,
    /// Unix milliseconds of the last change.
    pub updated_at: u64,
}

impl Job {
    /// The job's room.
    #[must_use]
    pub fn room(&self) -> String {
        room_of(&self.id)
    }

    /// The status endpoint's answer.
    #[must_use]
    pub fn status(&self) -> serde_json::Value {
        json!({
            "id": self.id,
            "name": self.name,
            "room": self.room(),
            "state": self.state,
            "progress": self.progress,
            "current_step": self.current_step,
            "reached": self.reached,
            "result": self.result,
            "error": self.error,
            "seq": self.seq,
            "epoch": self.epoch,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        })
    }
}

/// The room of job `id`.
#[must_use]
pub fn room_of(id: &str) -> String {
    format!("job_{id}")
}

struct Entry {
    job: Job,
    /// Held while an event is published and recorded, and while the status
    /// endpoint reads: a status answer and its `seq` always belong together.
    gate: Arc<tokio::sync::Mutex<()>>,
}

/// The jobs, by id: the app's source of truth, read by the policy (owner), the
/// status endpoint and the workers, and kept in a file when asked to.
pub struct Store {
    jobs: RwLock<HashMap<String, Entry>>,
    file: Option<PathBuf>,
    /// Serializes writes of the file.
    saving: Mutex<()>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl Store {
    fn open(file: Option<PathBuf>) -> Result<Self, StartError> {
        let mut jobs = HashMap::new();
        if let Some(path) = &file {
            match std::fs::read(path) {
                Ok(bytes) => {
                    let list: Vec<Job> = serde_json::from_slice(&bytes)
                        .map_err(|e| StartError::State(format!("{}: {e}", path.display())))?;
                    for job in list {
                        let gate = Arc::default();
                        jobs.insert(job.id.clone(), Entry { job, gate });
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StartError::State(format!("{}: {e}", path.display()))),
            }
        }
        Ok(Self {
            jobs: RwLock::new(jobs),
            file,
            saving: Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Entry>> {
        self.jobs.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.jobs.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `user` owns job `id`.
    #[must_use]
    pub fn is_owner(&self, id: &str, user: &str) -> bool {
        self.read().get(id).is_some_and(|e| e.job.owner == user)
    }

    /// A copy of job `id`.
    #[must_use]
    pub fn get(&self, id: &str) -> Option<Job> {
        self.read().get(id).map(|e| e.job.clone())
    }

    fn gate(&self, id: &str) -> Option<Arc<tokio::sync::Mutex<()>>> {
        self.read().get(id).map(|e| Arc::clone(&e.gate))
    }

    /// `user`'s jobs, newest first.
    #[must_use]
    pub fn of_user(&self, user: &str) -> Vec<Job> {
        let mut jobs: Vec<Job> = self
            .read()
            .values()
            .filter(|e| e.job.owner == user)
            .map(|e| e.job.clone())
            .collect();
        jobs.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        jobs
    }

    fn unfinished(&self) -> Vec<String> {
        self.read()
            .values()
            .filter(|e| !e.job.state.is_final())
            .map(|e| e.job.id.clone())
            .collect()
    }

    fn insert(&self, job: Job) -> Result<(), &'static str> {
        {
            let mut jobs = self.write();
            if jobs.len() >= MAX_JOBS {
                return Err("the server holds too many jobs; try again later");
            }
            let running = jobs
                .values()
                .filter(|e| e.job.owner == job.owner && !e.job.state.is_final())
                .count();
            if running >= MAX_RUNNING_PER_USER {
                return Err("too many unfinished jobs; wait for some to finish");
            }
            let gate = Arc::default();
            jobs.insert(job.id.clone(), Entry { job, gate });
        }
        self.save();
        Ok(())
    }

    fn update(&self, id: &str, change: impl FnOnce(&mut Job)) {
        {
            let mut jobs = self.write();
            let Some(entry) = jobs.get_mut(id) else {
                return;
            };
            change(&mut entry.job);
            entry.job.updated_at = now_ms();
        }
        self.save();
    }

    /// Writes every job to the state file (a temporary file, then a rename,
    /// so a crash never leaves half a file). Small files; a product has a
    /// database here.
    fn save(&self) {
        let Some(path) = &self.file else {
            return;
        };
        let _saving = self.saving.lock().unwrap_or_else(PoisonError::into_inner);
        let jobs: Vec<Job> = self.read().values().map(|e| e.job.clone()).collect();
        let bytes = match serde_json::to_vec(&jobs) {
            Ok(bytes) => bytes,
            Err(e) => return tracing::warn!(error = %e, "cannot encode the jobs"),
        };
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path)) {
            tracing::warn!(error = %e, path = %path.display(), "cannot save the jobs");
        }
    }
}

/// The rules of job rooms (see the module docs for why the owner comes from
/// the store).
struct JobsPolicy {
    store: Arc<Store>,
}

impl Policy for JobsPolicy {
    fn may_join(&self, who: &Identity, room: &RoomName) -> bool {
        room.as_str()
            .strip_prefix("job_")
            .is_some_and(|id| self.store.is_owner(id, who.user.as_str()))
    }

    fn publish_rule(&self, _who: &Identity, _room: &RoomName) -> PublishRule {
        PublishRule::ServerOnly
    }

    fn may_direct(&self, _who: &Identity, _to: &Target<'_>) -> bool {
        false // nothing in this app talks client to client
    }

    fn room_options(&self, _room: &RoomName) -> RoomOptions {
        // Nobody needs to know who else watches a job: no presence.
        RoomOptions::default().history(HISTORY).presence(false)
    }
}

/// The running app: its Switchboard, its sign-in, its jobs.
#[derive(Clone)]
pub struct App {
    switchboard: Switchboard,
    auth: JwtAuthenticator,
    store: Arc<Store>,
    options: Options,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("store", &self.store)
            .field("options", &self.options.transports)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Loads the jobs (when [`Options::state_file`] is set), builds the
    /// Switchboard, and resumes the unfinished jobs.
    ///
    /// # Errors
    /// No randomness, an unreadable state file, or a Switchboard that cannot
    /// be built.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(options: Options) -> Result<Self, StartError> {
        let secret = match &options.secret {
            Some(secret) => secret.clone(),
            None => {
                let mut secret = vec![0; 32];
                getrandom::fill(&mut secret).map_err(StartError::Random)?;
                secret
            }
        };
        let auth = JwtAuthenticator::hs256(&secret);
        let store = Arc::new(Store::open(options.state_file.clone())?);
        let switchboard = Switchboard::builder()
            .config(Config::default())
            .policy(JobsPolicy {
                store: Arc::clone(&store),
            })
            .authenticator(auth.clone())
            .origins(AllowOrigins::same_origin())
            .build()
            .map_err(StartError::Build)?;
        let app = Self {
            switchboard,
            auth,
            store,
            options,
        };
        for id in app.store.unfinished() {
            tracing::info!(job = %id, "resuming");
            app.spawn_worker(id);
        }
        Ok(app)
    }

    /// The app's Switchboard (shut it down to stop the app).
    #[must_use]
    pub fn switchboard(&self) -> &Switchboard {
        &self.switchboard
    }

    /// The jobs.
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Signs a token for `user`, as `POST /api/login` does.
    ///
    /// # Errors
    /// When signing fails.
    pub fn issue_token(&self, user: &str) -> Result<String, String> {
        self.auth
            .issue(user, now_ms() / 1000, TOKEN_TTL.as_secs(), json!({}))
            .map_err(|e| e.to_string())
    }

    /// Creates a job for `owner` and starts its worker.
    ///
    /// # Errors
    /// Too many jobs (for the user, or in all).
    pub fn start_job(&self, owner: &str, name: &str, fail: bool) -> Result<Job, &'static str> {
        let now = now_ms();
        let job = Job {
            id: new_id().map_err(|()| "no randomness for a job id")?,
            owner: owner.to_owned(),
            name: name.to_owned(),
            fail,
            state: JobState::Queued,
            progress: 0,
            current_step: "queued".into(),
            steps_done: 0,
            reached: BTreeMap::new(),
            result: None,
            error: None,
            seq: 0,
            epoch: None,
            created_at: now,
            updated_at: now,
        };
        self.store.insert(job.clone())?;
        self.spawn_worker(job.id.clone());
        Ok(job)
    }

    /// The worker runs on the Switchboard's task tracker, so shutdown waits
    /// for it to stop (it stops at once: its sleep ends on the shutdown
    /// token, and publishing fails from then on).
    fn spawn_worker(&self, id: String) {
        let app = self.clone();
        self.switchboard
            .tasks()
            .spawn(async move { app.run(&id).await });
    }

    /// Takes the job through its steps from where it is. Each event is
    /// published, then recorded; a publish that cannot go through (shutdown)
    /// stops the worker with the job as last recorded, to resume on the next
    /// start.
    async fn run(&self, id: &str) {
        let stop = self.switchboard.shutdown_token();
        let Some(job) = self.store.get(id) else {
            return;
        };
        let resumed = job.steps_done > 0;
        for (index, &(progress, step)) in STEPS.iter().enumerate().skip(job.steps_done) {
            // The first step starts at once; the others take their time (and
            // a resumed job waits before its next step too).
            if index > 0 || resumed {
                tokio::select! {
                    () = tokio::time::sleep(self.options.step) => {}
                    () = stop.cancelled() => return,
                }
            }
            if job.fail && step == FAILING_STEP {
                let error =
                    "Upload failed: the storage service refused the file (simulated failure)";
                let at = job_progress_before(index);
                let data = json!({"id": id, "progress": at, "current_step": step, "error": error});
                self.emit(id, "job_error", &data, |job| {
                    job.state = JobState::Failed;
                    step.clone_into(&mut job.current_step);
                    job.error = Some(error.to_owned());
                })
                .await;
                return;
            }
            let data = json!({"id": id, "progress": progress, "current_step": step});
            let recorded = self
                .emit(id, "job_progress", &data, |job| {
                    job.state = JobState::Running;
                    job.progress = progress;
                    step.clone_into(&mut job.current_step);
                    job.steps_done = index + 1;
                    job.reached.insert(step.to_owned(), now_ms());
                })
                .await;
            if !recorded {
                return;
            }
        }
        let result = result_of(&job);
        let data = json!({"id": id, "progress": 100, "result": result});
        self.emit(id, "job_completed", &data, |job| {
            job.state = JobState::Completed;
            job.progress = 100;
            job.result = Some(result.clone());
        })
        .await;
    }

    /// Publishes one event of job `id` to its room and records its effect and
    /// its room position, under the job's gate. A publish refused for now
    /// (`unavailable`: with a cluster broker, the broker is out of reach) is
    /// tried again with exponential backoff, the gate free in between so the
    /// status endpoint still answers. False when it cannot go through: the
    /// Switchboard is shutting down (the job resumes on the next start), or
    /// the event itself is refused, which trying again cannot change.
    async fn emit(
        &self,
        id: &str,
        event: &str,
        data: &serde_json::Value,
        change: impl FnOnce(&mut Job),
    ) -> bool {
        let stop = self.switchboard.shutdown_token();
        let mut change = Some(change);
        let mut wait = PUBLISH_RETRY_FIRST;
        loop {
            {
                let Some(gate) = self.store.gate(id) else {
                    return false;
                };
                let _gate = gate.lock().await;
                match self
                    .switchboard
                    .publish(&room_of(id), Some(event), data)
                    .await
                {
                    Ok(published) => {
                        self.store.update(id, |job| {
                            if let Some(change) = change.take() {
                                change(job);
                            }
                            job.seq = published.seq;
                            job.epoch = Some(published.epoch.as_str().to_owned());
                        });
                        return true;
                    }
                    Err(e) if e.is_unavailable() => {
                        tracing::warn!(job = %id, error = %e, retry_in = ?wait, "publish failed for now");
                    }
                    Err(e) if e.is_shutting_down() => {
                        tracing::info!(job = %id, "job paused until the next start");
                        return false;
                    }
                    Err(e) => {
                        tracing::error!(job = %id, event, error = %e, "event refused; job paused");
                        return false;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return false,
            }
            wait = (wait * 2).min(PUBLISH_RETRY_MAX);
        }
    }

    /// The job's status, read under its gate (so never between a publish and
    /// its record).
    async fn status(&self, id: &str) -> Option<Job> {
        let gate = self.store.gate(id)?;
        let _gate = gate.lock().await;
        self.store.get(id)
    }
}

/// Progress reached before step `index`.
fn job_progress_before(index: usize) -> u8 {
    index
        .checked_sub(1)
        .and_then(|i| STEPS.get(i))
        .map_or(0, |&(p, _)| p)
}

/// What a completed job produced (made up, but stable for a job).
fn result_of(job: &Job) -> serde_json::Value {
    let rows = job.id.bytes().fold(0u32, |acc, b| {
        acc.wrapping_mul(31).wrapping_add(u32::from(b))
    }) % 9000
        + 1000;
    let stem: String = job
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let stem = stem.trim_matches('-');
    let stem = if stem.is_empty() { "export" } else { stem };
    json!({"file": format!("{stem}-{}.csv", job.id), "rows": rows})
}

/// Every route of the app: the page, its API, and the chosen Switchboard
/// transports with the browser client and metrics.
#[must_use]
pub fn routes(app: &App) -> BoxedFilter<(warp::reply::Response,)> {
    let index = warp::path::end()
        .and(warp::get())
        .map(|| asset(INDEX_HTML, "text/html; charset=utf-8"));
    let script = warp::path!("jobs.js")
        .and(warp::get())
        .map(|| asset(JOBS_JS, "text/javascript; charset=utf-8"));
    let style = warp::path!("jobs.css")
        .and(warp::get())
        .map(|| asset(JOBS_CSS, "text/css; charset=utf-8"));
    let sb = &app.switchboard;
    let mut routes = index
        .or(script)
        .unify()
        .or(style)
        .unify()
        .or(api(app))
        .unify()
        .or(switchboard_warp::client_script())
        .unify()
        .or(switchboard_warp::metrics(sb))
        .unify()
        .boxed();
    // Only the transports asked for: a refused one answers 404, and the
    // browser client falls back to the next.
    let transports = app.options.transports;
    if transports.websocket {
        routes = routes.or(switchboard_warp::websocket(sb)).unify().boxed();
    }
    if transports.sse {
        routes = routes.or(switchboard_warp::sse(sb)).unify().boxed();
    }
    if transports.longpoll {
        routes = routes.or(switchboard_warp::longpoll(sb)).unify().boxed();
    }
    routes
}

/// Serves the app on `listener` until its Switchboard shuts down.
pub async fn serve(listener: tokio::net::TcpListener, app: App) {
    let stop = app.switchboard.shutdown_token();
    warp::serve(routes(&app))
        .incoming(listener)
        .graceful(async move { stop.cancelled().await })
        .run()
        .await;
}

/// The largest JSON body the API reads.
const MAX_BODY: u64 = 4096;

fn api(app: &App) -> BoxedFilter<(warp::reply::Response,)> {
    let a = app.clone();
    let login = warp::path!("api" / "login")
        .and(warp::post())
        .and(warp::body::content_length_limit(MAX_BODY))
        .and(warp::body::bytes())
        .map(move |body: Bytes| login(&a, &body));
    let a = app.clone();
    let create = warp::path!("api" / "jobs")
        .and(warp::post())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::body::content_length_limit(MAX_BODY))
        .and(warp::body::bytes())
        .map(move |auth: Option<String>, body: Bytes| create_job(&a, auth.as_deref(), &body));
    let a = app.clone();
    let list = warp::path!("api" / "jobs")
        .and(warp::get())
        .and(warp::header::optional::<String>("authorization"))
        .map(move |auth: Option<String>| match a.user(auth.as_deref()) {
            Ok(user) => {
                let jobs: Vec<_> = a.store.of_user(&user).iter().map(Job::status).collect();
                json_reply(http::StatusCode::OK, &json!({ "jobs": jobs }))
            }
            Err(why) => unauthorized(&why),
        });
    let a = app.clone();
    let status = warp::path!("api" / "jobs" / String / "status")
        .and(warp::get())
        .and(warp::header::optional::<String>("authorization"))
        .then(move |id: String, auth: Option<String>| {
            let a = a.clone();
            async move { job_status(&a, &id, auth.as_deref()).await }
        });
    login
        .or(create)
        .unify()
        .or(list)
        .unify()
        .or(status)
        .unify()
        .boxed()
}

impl App {
    /// The signed-in user of a request, from its `Authorization: Bearer` JWT,
    /// or why not (answered 401 by [`unauthorized`]).
    fn user(&self, authorization: Option<&str>) -> Result<String, String> {
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| "sign in first".to_owned())?;
        self.auth
            .verify(token)
            .map(|identity| identity.user.as_str().to_owned())
            .map_err(|refusal| format!("sign in again ({})", refusal.message))
    }
}

#[derive(Deserialize)]
struct LoginBody {
    user: String,
}

/// `POST /api/login {"user"}`: a demo sign-in that believes the name it is
/// given, and answers a signed token for it. A real app checks a password
/// (or hands sign-in to an identity provider) before it signs anything.
fn login(app: &App, body: &[u8]) -> warp::reply::Response {
    let Ok(LoginBody { user }) = serde_json::from_slice(body) else {
        return error(
            http::StatusCode::BAD_REQUEST,
            "invalid_frame",
            "send {\"user\": \"your name\"}",
        );
    };
    let user = user.trim();
    if user.is_empty() || user.chars().count() > 32 || user.chars().any(char::is_control) {
        return error(
            http::StatusCode::BAD_REQUEST,
            "invalid_frame",
            "a name is 1 to 32 characters",
        );
    }
    match app.issue_token(user) {
        Ok(token) => json_reply(
            http::StatusCode::OK,
            &json!({"user": user, "token": token, "expires_in": TOKEN_TTL.as_secs()}),
        ),
        Err(e) => error(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            &e,
        ),
    }
}

#[derive(Deserialize, Default)]
struct CreateBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    fail: bool,
}

/// `POST /api/jobs {"name"?, "fail"?}` with the bearer JWT: `201` and the new
/// job's status (`id`, `room`, ...).
fn create_job(app: &App, authorization: Option<&str>, body: &[u8]) -> warp::reply::Response {
    let user = match app.user(authorization) {
        Ok(user) => user,
        Err(why) => return unauthorized(&why),
    };
    let request: CreateBody = if body.iter().all(u8::is_ascii_whitespace) {
        CreateBody::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(e) => {
                return error(
                    http::StatusCode::BAD_REQUEST,
                    "invalid_frame",
                    &format!("bad job: {e}"),
                )
            }
        }
    };
    let name = request.name.as_deref().map_or("", str::trim);
    let name: String = if name.is_empty() {
        "Untitled job".into()
    } else {
        name.chars().take(64).collect()
    };
    match app.start_job(&user, &name, request.fail) {
        Ok(job) => json_reply(http::StatusCode::CREATED, &job.status()),
        Err(why) => error(http::StatusCode::TOO_MANY_REQUESTS, "rate_limited", why),
    }
}

/// `GET /api/jobs/{id}/status` with the bearer JWT: the owner's view of the job.
async fn job_status(app: &App, id: &str, authorization: Option<&str>) -> warp::reply::Response {
    let user = match app.user(authorization) {
        Ok(user) => user,
        Err(why) => return unauthorized(&why),
    };
    match app.status(id).await {
        None => error(http::StatusCode::NOT_FOUND, "not_found", "no such job"),
        Some(job) if job.owner != user => error(
            http::StatusCode::FORBIDDEN,
            "forbidden",
            "this job belongs to another user",
        ),
        Some(job) => json_reply(http::StatusCode::OK, &job.status()),
    }
}

/// 48 random bits as 12 lowercase hex digits.
fn new_id() -> Result<String, ()> {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).map_err(|_| ())?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn asset(body: &'static str, content_type: &'static str) -> warp::reply::Response {
    let mut response = http::Response::new(Bytes::from_static(body.as_bytes()));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    // The page builds every node with textContent; on top of that no inline
    // script or foreign origin may run or be reached.
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    response.map(Into::into)
}

fn json_reply(status: http::StatusCode, body: &serde_json::Value) -> warp::reply::Response {
    let mut response = http::Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response.map(Into::into)
}

fn unauthorized(why: &str) -> warp::reply::Response {
    error(http::StatusCode::UNAUTHORIZED, "unauthorized", why)
}

fn error(status: http::StatusCode, code: &str, message: &str) -> warp::reply::Response {
    json_reply(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_parse() {
        assert_eq!("websocket,sse,longpoll".parse(), Ok(Transports::ALL));
        let fallback: Transports = "sse, poll".parse().unwrap();
        assert!(!fallback.websocket && fallback.sse && fallback.longpoll);
        assert!("".parse::<Transports>().is_err());
        assert!("carrier-pigeon".parse::<Transports>().is_err());
    }

    #[test]
    fn policy_lets_only_the_owner_join_and_only_the_server_publish() {
        let store = Arc::new(Store::open(None).unwrap());
        let job = Job {
            id: "abc123".into(),
            owner: "alice".into(),
            name: "x".into(),
            fail: false,
            state: JobState::Queued,
            progress: 0,
            current_step: "queued".into(),
            steps_done: 0,
            reached: BTreeMap::new(),
            result: None,
            error: None,
            seq: 0,
            epoch: None,
            created_at: 0,
            updated_at: 0,
        };
        store.insert(job).unwrap();
        let policy = JobsPolicy { store };
        let room = RoomName::new("job_abc123").unwrap();
        let alice = Identity::new("alice");
        assert!(policy.may_join(&alice, &room));
        assert!(!policy.may_join(&Identity::new("bob"), &room));
        assert!(!policy.may_join(&alice, &RoomName::new("job_nope").unwrap()));
        assert!(!policy.may_join(&alice, &RoomName::new("lobby").unwrap()));
        assert_eq!(policy.publish_rule(&alice, &room), PublishRule::ServerOnly);
        assert_eq!(policy.room_options(&room).history, HISTORY);
    }

    #[test]
    fn a_failing_job_fails_after_working() {
        let index = STEPS.iter().position(|s| s.1 == FAILING_STEP).unwrap();
        assert_eq!(job_progress_before(index), 30);
        assert_eq!(job_progress_before(0), 0);
    }
}
