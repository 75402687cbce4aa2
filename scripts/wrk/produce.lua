-- wrk script: POST produce requests of RECORDS keyless records, each value 100 bytes as stored
-- (a JSON string of 98 characters plus its quotes).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/vnd.kafka.json.v2+json"
local records = tonumber(os.getenv("RECORDS") or "100")
local value = '{"value":"' .. string.rep("x", 98) .. '"}'
local parts = {}
for i = 1, records do
  parts[i] = value
end
wrk.body = '{"records":[' .. table.concat(parts, ",") .. ']}'

local failures = 0
function response(status, headers, body)
  if status ~= 200 then
    failures = failures + 1
    if failures <= 3 then
      io.stderr:write("unexpected status " .. status .. ": " .. body .. "\n")
    end
  end
end
