-- slmfleet.io/ModelRollout/rules.lua: the ModelRollout's own rules. Not a script by itself: the
-- generated health.lua next to it runs them after lib/common.lua, whose locals they use (status,
-- ready, progressing, describe, text, health, ...).
--
-- Besides the conditions, the operator writes status.phase (Pending, Evaluating, Progressing,
-- Paused, Promoted, RolledBack, Failed) and status.message; a pause step is phase Paused with
-- Progressing=True, reason Paused. A rolled-back or failed rollout is Degraded=True (reason
-- RolledBack / Failed, handled by common.lua); a promoted one, or one with nothing to roll out, is
-- Ready=True. After common.lua's checks (no status, Degraded, stale generation), in order:
--   paused at a pause step                            -> Suspended: until when, at which weight
--   Ready=True                                        -> Healthy
--   otherwise                                         -> Progressing, with the operator's words

local paused = status.phase == "Paused"
if progressing ~= nil and progressing.status == "True" and progressing.reason == "Paused" then
  paused = true
end
if paused then
  if progressing ~= nil and progressing.reason == "Paused" then
    return health("Suspended", describe(progressing))
  end
  return health("Suspended", "Paused: " .. text(status.message))
end

if ready ~= nil and ready.status == "True" then
  return health("Healthy", describe(ready))
end
if progressing ~= nil then
  return health("Progressing", describe(progressing))
end
if ready ~= nil then
  return health("Progressing", describe(ready))
end
if text(status.phase) ~= "" then
  return health("Progressing", status.phase .. ": " .. text(status.message))
end
return health("Progressing", "waiting for the operator to report Ready")
