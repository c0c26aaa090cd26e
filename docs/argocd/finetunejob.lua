-- Argo CD health check for tailor.dev/FineTuneJob (see docs/gitops.md).
-- Argo CD runs it in gopher-lua (Lua 5.1) with the object as the global `obj`, and by default
-- opens only the base, table and package libraries: no `string` or `math` here, on purpose.
--   status missing, or status.observedGeneration behind metadata.generation -> Progressing
--   phase Failed, or condition Stalled=True                                -> Degraded
--   phase Suspended                                                         -> Suspended
--   condition Ready=True (phase Succeeded; continuous learning idles here)  -> Healthy
--   anything else (Pending ... Evaluating, a retry waiting)                 -> Progressing
local hs = {}

local function nonEmpty(s)
  return s ~= nil and s ~= ""
end

local function condition(status, condType)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == condType then
      return c
    end
  end
  return nil
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local status = obj.status

-- as kstatus (Flux) does: a status.observedGeneration behind the spec means the status is old;
-- without one, each condition's own observedGeneration decides (see holds below)
if status == nil or (status.observedGeneration ~= nil and generation ~= nil
    and status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on the current spec"
  if generation ~= nil then
    hs.message = hs.message .. " (generation " .. generation .. ")"
  end
  return hs
end

-- a condition written for an older generation says nothing about the current spec
local function holds(c)
  return c ~= nil and c.status == "True"
      and (c.observedGeneration == nil or generation == nil or c.observedGeneration >= generation)
end

local function describeError(fallback)
  local e = status.error
  if e == nil or not nonEmpty(e.message) then
    return fallback
  end
  local m = e.message
  if nonEmpty(e.reason) then
    m = e.reason .. ": " .. m
  end
  if nonEmpty(e.field) then
    m = m .. " (field " .. e.field .. ")"
  end
  return m
end

local phase = status.phase
if not nonEmpty(phase) then
  phase = "Pending"
end
local ready = condition(status, "Ready")
local stalled = condition(status, "Stalled")

if phase == "Failed" or holds(stalled) then
  local fallback = "FineTuneJob is " .. phase
  if stalled ~= nil and nonEmpty(stalled.message) then
    fallback = stalled.message
  elseif ready ~= nil and nonEmpty(ready.message) then
    fallback = ready.message
  end
  hs.status = "Degraded"
  hs.message = describeError(fallback)
  return hs
end

if phase == "Suspended" then
  local suspended = condition(status, "Suspended")
  hs.status = "Suspended"
  hs.message = "Suspended (spec.suspend is true)"
  if suspended ~= nil and nonEmpty(suspended.message) then
    hs.message = suspended.message
  end
  return hs
end

if holds(ready) then
  hs.status = "Healthy"
  hs.message = "Succeeded"
  if nonEmpty(ready.message) then
    hs.message = ready.message
  elseif status.champion ~= nil and nonEmpty(status.champion.run) then
    hs.message = hs.message .. "; champion " .. status.champion.run
  end
  return hs
end

-- in flight: phase, stage and progress, then why it waits (if it says)
local m = phase
if nonEmpty(status.stage) then
  m = m .. ": stage " .. status.stage
end
local p = status.progress
local detail = false
if p ~= nil then
  if p.percent ~= nil then
    m = m .. ", " .. p.percent .. "%"
    detail = true
  end
  if p.step ~= nil and p.totalSteps ~= nil then
    m = m .. " (step " .. p.step .. "/" .. p.totalSteps .. ")"
    detail = true
  end
  if p.etaSeconds ~= nil then
    m = m .. ", ETA " .. p.etaSeconds .. "s"
  end
end
local why = describeError(nil)
if why == nil and not detail and ready ~= nil and nonEmpty(ready.message) then
  why = ready.message
end
if why ~= nil then
  m = m .. " - " .. why
end
hs.status = "Progressing"
hs.message = m
return hs
