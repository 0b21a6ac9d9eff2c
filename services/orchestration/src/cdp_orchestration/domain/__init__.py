"""Orchestration's domain: journeys, instances, the per-person arbiter, experiments and templates. No I/O.

Everything here is plain Python over frozen values: no asyncio, no clock (time is always passed in as epoch
seconds), no randomness (ids and split variants are hashes). The service layer feeds it stimuli and carries
out the commands it returns; it owns storage, timers and the bus.

Modules:
- `journey`: the model of one journey version. `document`: the journey document (JSON/YAML) -> `Journey`,
  validated as a whole (`JourneyInvalid` lists every problem as the API's Problem: node id, field within
  it, message). Event names, fields, segments and purposes are checked only against a `Catalogue` that
  lists them: without one a misspelt event name passes validation and never matches. It reads the
  document with `document_fields` (problems, the catalogue, checks every part shares), `document_steps`
  (the steps) and `document_graph` (targets, reachability, loops that never wait).
  `lifecycle`: draft -> active <-> paused -> archived, immutable published versions, `migration_plan`
  between versions.
- `instance`: one person in one journey version: `step(instance, journey, stimulus, view, now)`.
  `entry`: who enters and when (`enters_on_*`, `next_scheduled_entry`, `admit`).
- `arbiter` (+ `rules`): one arbiter per person across every journey: `decide`, `release`, `approve`,
  `reject`, `withdraw`, `observe`, `next_wake`, and `merge_states` when one person is merged into another.
- `experiments`: per-variant entries, conversions, uplift against control and a p-value, from counts.
- `templates`: Jinja2 sandbox over profile fields; a missing field is `MissingField`, never a blank.
- `records`: instances and arbiter state as plain dicts for storage, round-tripping exactly.
- `conditions`: the one door to the condition language (`cdp_lang`). `view`, `clock`: the person as the
  domain sees them, and wall-clock arithmetic in their zone.

The contract with the service layer (the engine, durable timers, the gRPC API):

1. Entry. For each resolved event, segment change, Enroll call or scheduled slot, for each journey whose
   record `accepts_entries` and whose entry matches (`enters_on_*`), ask `admit(journey, history, now)`
   with the person's `EntryHistory` for that journey (its `reason` is EnrollResponse's: reentry_never,
   cooldown, concurrency_cap). If admitted: `new_instance(journey, person, trigger_id)` (trigger id: the
   event's id `<source id>:<messageId>`, the Enroll idempotency key, or `schedule_trigger(at)`), then `step(..., Enter(event))`, or
   `Enter(properties=...)` for an Enroll call's properties. These are the instance's entry fields, which
   its conditions and templates read as `entry.<name>`.
   The instance id is derived from the trigger, so a redelivered trigger finds the instance that exists and
   must not start a second one.
2. Stimuli. Route to every running instance of the person (and ended ones still `watching_goal`):
   `EventArrived` for each event, `ProfileChanged` after a profile/score/consent/segment change,
   `TimerFired` when a scheduled timer fires, `ActionOutcome(action_id, kind)` for each arbiter decision
   about one of its actions, `ExitRequest(reason)` for an API exit or an archived journey. Always pass the
   person's current `PersonView` and the stimulus' time.
3. Commands, to be carried out in order and only after the new instance state is durable (the engine's
   outbox): `ScheduleTimer(id, at)` -> a durable timer with that id (a message schedule whose subject holds
   the id; scheduling the same id twice is one timer); `CancelTimer(id)` -> purge it; `ProposeAction` ->
   `arbiter.decide`; `WithdrawAction` -> `arbiter.withdraw`; `Assigned` / `RecordGoal` -> experiment
   counts; `End` -> the instance's end, with its reason, in its history.
4. The arbiter's `PersonState` is per person (the same partition as the person's instances, so one
   writer). Every `Decision` in a `Ruling` is appended to the person's decision history and fed back to
   the instance as `ActionOutcome` (only final ones move it on: deferred, superseded and awaiting approval
   are held, and a later ruling decides them again). On `sent`, render the action's template (its node's, in the action's
   own `journey_version`, with the instance's `entry` properties; a `MissingField` is a failed action
   naming the field, never a blank) and publish
   `actions.<channel>` with the action id as the message id. After every ruling, keep one durable timer
   at `next_wake(state)`; when it fires, call `release`. Pass `PersonView.behind` while the person's fields
   lag behind their events (the profile's change for one has not arrived): the arbiter holds actions until
   they catch up; call `release` when they have. Events named in `rules.watched_events` go to
   `observe` before anything is decided for that event.
5. Ids are stable: replaying the same stimuli over the same state gives the same ids and decisions, so the
   service may redo any step after a crash as long as it deduplicates by id (timers, actions, decisions).
6. Conditions that read aggregates need profile computed traits: `Journey.computed_traits` lists their
   definitions, to be registered with the profile service when a version is published.
"""
