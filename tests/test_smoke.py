"""A first end-to-end check through the test server."""

from tests.conftest import submit, wait_status


async def test_submit_then_poll_to_result(client):
    """A submitted echo job is accepted, runs, and its result is readable."""
    job = await submit(client, "echo", {"x": 1})
    done = await wait_status(client, job["id"], "succeeded")
    assert done["result"] == {"x": 1}
    resp = await client.get(f"/jobs/{job['id']}/result")
    assert resp.status == 200 and await resp.json() == {"x": 1}


async def test_server_process_serves(server_factory, http):
    """`asyncjobs serve` starts, logs where it listens, and answers."""
    server = server_factory()
    async with http.get(server.url + "/healthz") as resp:
        assert resp.status == 200
