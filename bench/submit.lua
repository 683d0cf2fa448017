-- wrk script for W1: POST /jobs with the noop body, as JSON.
wrk.method = "POST"
wrk.path = "/jobs"
wrk.body = '{"task":"noop","params":{}}'
wrk.headers["Content-Type"] = "application/json"
