-- slmfleet.io/SmallModel/rules.lua: the SmallModel's own rules. Not a script by itself: the
-- generated health.lua next to it runs them after lib/common.lua, whose locals they use (status,
-- ready, progressing, describe, health, ...).
--
-- After common.lua's checks (no status, Degraded, stale generation), in order:
--   Ready=True, a new revision replacing the serving
--     one (Progressing=True, reason RollingOut)       -> Progressing
--   Ready=True                                        -> Healthy (a canary under a ModelRollout
--                                                        too: the ModelRollout's health shows it)
--   Ready=False, reason ScaledToZero                  -> Healthy: serving.replicas is 0 on purpose
--   otherwise                                         -> Progressing, with the operator's words

if ready ~= nil and ready.status == "True" then
  if progressing ~= nil and progressing.status == "True" then
    if progressing.reason == "RollingOut" then
      return health("Progressing", describe(progressing))
    end
    return health("Healthy", describe(ready) .. "; " .. describe(progressing))
  end
  return health("Healthy", describe(ready))
end
if ready ~= nil and ready.reason == "ScaledToZero" then
  return health("Healthy", describe(ready))
end
if ready ~= nil then
  return health("Progressing", describe(ready))
end
if progressing ~= nil then
  return health("Progressing", describe(progressing))
end
return health("Progressing", "waiting for the operator to report Ready")
