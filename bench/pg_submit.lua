-- wrk script for W1 on PostgreSQL: POST /jobs with the noop body, as JSON; with WRK_PORTS="p1 p2 ..."
-- (bench/pg.py sets it) wrk's threads go to those ports of 127.0.0.1 in turn, one node each
-- (run wrk with -t equal to the number of ports), so one latency histogram covers every node.
wrk.method = "POST"
wrk.path = "/jobs"
wrk.body = '{"task":"noop","params":{}}'
wrk.headers["Content-Type"] = "application/json"

local ports = {}
for port in string.gmatch(os.getenv("WRK_PORTS") or "", "%d+") do
  table.insert(ports, port)
end
local next_thread = 0

function setup(thread)
  if #ports > 0 then
    thread.addr = wrk.lookup("127.0.0.1", ports[(next_thread % #ports) + 1])[1]
    next_thread = next_thread + 1
  end
end
