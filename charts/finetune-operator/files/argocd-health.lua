-- Argo CD health check for finetune.dev/FineTuneJob (resource.customizations.health.finetune.dev_FineTuneJob).
-- Succeeded -> Healthy, Failed -> Degraded, suspended or queued for admission -> Suspended,
-- a spec generation the operator has not observed yet, or any stage under way -> Progressing.
local hs = {}
if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick the FineTuneJob up"
  return hs
end
local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
local reconciling = nil
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Reconciling" then
      reconciling = condition
    end
  end
end
local phase = status.phase or "Pending"
local message = status.message or phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  if status.metrics ~= nil and status.metrics.summary ~= nil then
    message = status.metrics.summary
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Suspended" then
  hs.status = "Suspended"
elseif reconciling ~= nil and reconciling.status == "True" and reconciling.reason == "WaitingForAdmission" then
  hs.status = "Suspended"
  message = reconciling.message
else
  hs.status = "Progressing"
end
hs.message = message
return hs
