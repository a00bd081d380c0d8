-- Argo CD health check for slmfleet.io/SmallModel
-- (argocd-cm key resource.customizations.health.slmfleet.io_SmallModel).
--
-- Libraries: Argo CD runs argocd-cm health scripts with only Lua's base, package and table
-- libraries open (plus a restricted os reachable through require) unless
-- resource.customizations.useOpenLibs.slmfleet.io_SmallModel is true. This script needs the base
-- library alone (type, ipairs) and the .. operator: no string, math or os functions, and no string
-- methods such as s:find, which need the string library too.
--
-- The operator writes status.observedGeneration and the conditions Ready, Progressing and
-- Degraded, each with its observedGeneration; other condition types (WeightsVerified, ...) are
-- ignored here. In order:
--   no status                                         -> Progressing: waiting for the operator
--   Degraded=True, computed for metadata.generation   -> Degraded: reason and message
--   status or a condition older than the generation   -> Progressing: the operator has not caught up
--   Ready=True, a new revision replacing the serving
--     one (Progressing=True, reason RollingOut)       -> Progressing
--   Ready=True                                        -> Healthy (a canary under a ModelRollout
--                                                        too: the ModelRollout's health shows it)
--   Ready=False, reason ScaledToZero                  -> Healthy: serving.replicas is 0 on purpose
--   otherwise                                         -> Progressing, with the operator's words

local function find(conditions, kind)
  if type(conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(conditions) do
    if type(c) == "table" and c.type == kind then
      return c
    end
  end
  return nil
end

local function text(value)
  if type(value) == "string" then
    return value
  end
  return ""
end

-- "Reason: message", as kubectl describe would put it.
local function describe(c)
  local reason = text(c.reason)
  local message = text(c.message)
  if reason == "" then
    reason = text(c.type) .. "=" .. text(c.status)
  end
  if message == "" then
    return reason
  end
  return reason .. ": " .. message
end

local function health(status, message)
  return { status = status, message = message }
end

local status = obj.status
local conditions = nil
if type(status) == "table" then
  conditions = status.conditions
end
if type(status) ~= "table" or (status.observedGeneration == nil and (type(conditions) ~= "table" or #conditions == 0)) then
  return health("Progressing", "waiting for the operator")
end

local generation = nil
if type(obj.metadata) == "table" and type(obj.metadata.generation) == "number" then
  generation = obj.metadata.generation
end
local observed = status.observedGeneration

-- Whether a condition describes the current spec: its own observedGeneration, or the status's.
local function current(c)
  if generation == nil then
    return true
  end
  local g = c.observedGeneration
  if type(g) ~= "number" then
    g = observed
  end
  return type(g) == "number" and g >= generation
end

local ready = find(conditions, "Ready")
local progressing = find(conditions, "Progressing")
local degraded = find(conditions, "Degraded")

-- A Degraded condition computed for this generation counts even when the rest of the status lags
-- (the operator reports a reconcile that keeps failing that way).
if degraded ~= nil and degraded.status == "True" and current(degraded) then
  return health("Degraded", describe(degraded))
end

if generation ~= nil and (type(observed) ~= "number" or observed < generation) then
  local from = "no generation yet"
  if type(observed) == "number" then
    from = "generation " .. observed
  end
  return health("Progressing", "waiting for the operator to act on generation " .. generation ..
    " (status is from " .. from .. ")")
end
for _, kind in ipairs({ "Ready", "Progressing", "Degraded" }) do
  local c = find(conditions, kind)
  if c ~= nil and generation ~= nil and type(c.observedGeneration) == "number" and c.observedGeneration < generation then
    return health("Progressing", "waiting for the operator: the " .. kind .. " condition is from generation " ..
      c.observedGeneration .. ", the spec is at generation " .. generation)
  end
end

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
