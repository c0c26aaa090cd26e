-- Argo CD health check for tailor.dev/Dataset (see docs/gitops.md).
-- Argo CD runs it in gopher-lua (Lua 5.1) with the object as the global `obj`, and by default
-- opens only the base, table and package libraries: no `string` or `math` here, on purpose.
--   status missing, or status.observedGeneration behind metadata.generation -> Progressing
--   condition Stalled=True (validation failed or refused)                   -> Degraded
--   condition Ready=True                                                    -> Healthy
--   anything else (validating, Ready Unknown)                               -> Progressing
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
  hs.message = "Waiting for the operator to validate the current spec"
  if generation ~= nil then
    hs.message = hs.message .. " (generation " .. generation .. ")"
  end
  return hs
end

local function holds(c)
  return c ~= nil and c.status == "True"
      and (c.observedGeneration == nil or generation == nil or c.observedGeneration >= generation)
end

local ready = condition(status, "Ready")
local stalled = condition(status, "Stalled")

if holds(stalled) then
  local m = "Validation failed"
  if nonEmpty(stalled.message) then
    m = stalled.message
  elseif ready ~= nil and nonEmpty(ready.message) then
    m = ready.message
  end
  if nonEmpty(stalled.reason) then
    m = stalled.reason .. ": " .. m
  end
  local first = nil
  if status.firstErrors ~= nil then
    first = status.firstErrors[1]
  end
  if first ~= nil and first.line ~= nil and nonEmpty(first.reason) then
    m = m .. " (first error: line " .. first.line .. ", " .. first.reason .. ")"
  end
  hs.status = "Degraded"
  hs.message = m
  return hs
end

if holds(ready) then
  hs.status = "Healthy"
  hs.message = "Ready"
  if nonEmpty(ready.message) then
    hs.message = ready.message
  end
  if nonEmpty(status.revision) then
    hs.message = "revision " .. status.revision .. ": " .. hs.message
  end
  return hs
end

local m = "Validating"
local reconciling = condition(status, "Reconciling")
if reconciling ~= nil and nonEmpty(reconciling.message) then
  m = m .. ": " .. reconciling.message
elseif ready ~= nil and nonEmpty(ready.message) then
  m = m .. ": " .. ready.message
end
hs.status = "Progressing"
hs.message = m
return hs
