-- lib/common.lua: the part every slmfleet Argo CD health check shares. Each
-- slmfleet.io/<Kind>/health.lua is generated as this file followed by that kind's rules.lua
-- (`python -m e2e.argocd_health.cm_patch`): Argo CD stores a health script as one string in
-- argocd-cm and cannot require files of ours, so these lines are copied into each script, not loaded.
--
-- Libraries: Argo CD runs argocd-cm health scripts with only Lua's base, package and table
-- libraries open (plus a restricted os reachable through require) unless
-- resource.customizations.useOpenLibs.slmfleet.io_<Kind> is true. These scripts need the base
-- library alone (type, ipairs) and the .. operator: no string, math or os functions, and no string
-- methods such as s:find, which need the string library too.
--
-- The operator writes status.observedGeneration and the conditions Ready, Progressing and
-- Degraded, each with its observedGeneration; other condition types (WeightsVerified, ...) are
-- ignored. This part decides, in order:
--   no status                                         -> Progressing: waiting for the operator
--   Degraded=True, computed for metadata.generation   -> Degraded: reason and message
--   status or a condition older than the generation   -> Progressing: the operator has not caught up
-- and otherwise falls through to the kind's rules, which use its locals: status, conditions,
-- generation, observed, ready, progressing, degraded, and the helpers find, text, describe,
-- health and current.

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
