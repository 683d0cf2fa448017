"""queue_position in a 202 (from in-memory counts) agrees with the monitor's (from the store)."""

from tests.conftest import eventually, submit


async def test_submit_position_matches_the_monitor(make_client):
    """For jobs of mixed priorities behind a busy worker, each 202's position is the monitor's at that moment."""
    client, app = await make_client(queue={"workers": 1, "shutdown_grace": 0.5})
    blocker = await submit(client, "block", {"seconds": 30})
    await eventually(lambda: blocker["id"] in app.workers.running, "the blocker to run")
    for priority in (0, 5, 0, 5, 10, -1, 5):
        accepted = await submit(client, "echo", {"p": priority}, priority=priority)
        resp = await client.get(f"/jobs/{accepted['id']}")
        assert accepted["queue_position"] == (await resp.json())["queue_position"], priority
    assert app.queue.queued == await app.store.count_queued() == 7
    await client.post(f"/jobs/{blocker['id']}/cancel")
    await eventually(lambda: app.queue.queued == 0, "the queue to drain")


async def test_submit_position_matches_the_monitor_while_principals_take_turns(make_client):
    """Alice queues ten jobs behind a busy worker; bob's jobs, taking turns with hers, are not last of their
    priority: each 202 still gives the position the monitor gives."""
    tokens = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}
    alice, bob = ({"Authorization": f"Bearer {t}"} for t in tokens.values())
    client, app = await make_client(queue={"workers": 1, "shutdown_grace": 0.5}, auth={"tokens": tokens})
    blocker = await (await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}},
                                       headers=alice)).json()
    await eventually(lambda: blocker["id"] in app.workers.running, "the blocker to run")
    for i in range(10):
        assert (await client.post("/jobs", json={"task": "echo", "params": {"a": i}}, headers=alice)).status == 202
    for headers in (bob, bob, bob, alice):
        accepted = await (await client.post("/jobs", json={"task": "echo", "params": {}}, headers=headers)).json()
        monitor = await (await client.get(f"/jobs/{accepted['id']}", headers=headers)).json()
        assert accepted["queue_position"] == monitor["queue_position"], (accepted, monitor)
    await client.post(f"/jobs/{blocker['id']}/cancel", headers=alice)


async def test_list_positions_match_the_monitor(make_client):
    """GET /jobs gives each queued job the same position as its monitor (one query for the whole page)."""
    client, app = await make_client(queue={"workers": 1, "shutdown_grace": 0.5})
    blocker = await submit(client, "block", {"seconds": 30})
    await eventually(lambda: blocker["id"] in app.workers.running, "the blocker to run")
    for priority in (0, 5, 0, 10, -1):
        await submit(client, "echo", {"p": priority}, priority=priority)
    listed = (await (await client.get("/jobs", params={"status": "queued"})).json())["jobs"]
    assert sorted(j["queue_position"] for j in listed) == [1, 2, 3, 4, 5]
    for job in listed:
        monitor = await (await client.get(f"/jobs/{job['id']}")).json()
        assert job["queue_position"] == monitor["queue_position"]
    await client.post(f"/jobs/{blocker['id']}/cancel")


async def test_a_placed_jobs_position_leaves_out_delayed_jobs_of_higher_priority(make_client):
    """Jobs of priority 5 that wait out a delay hold no place yet: a due job of priority 0 behind a busy worker
    is 1 in its 202, on its monitor and in the list, and stays so; the delayed ones, while they wait, are
    each given the same position on the monitor and in the list."""
    client, app = await make_client(queue={"workers": 1, "shutdown_grace": 0.5})
    blocker = await submit(client, "block", {"seconds": 30})
    await eventually(lambda: blocker["id"] in app.workers.running, "the blocker to run")
    delayed = [await submit(client, "echo", {"d": i}, priority=5, delay=3600) for i in range(3)]
    due = await submit(client, "echo", {"due": True}, priority=0)
    later = await submit(client, "echo", {"due": 2}, priority=0)
    assert (due["queue_position"], later["queue_position"]) == (1, 2)
    monitors = {j["id"]: (await (await client.get(f"/jobs/{j['id']}")).json())["queue_position"]
                for j in [*delayed, due, later]}
    assert (monitors[due["id"]], monitors[later["id"]]) == (1, 2), monitors
    listed = {j["id"]: j["queue_position"]
              for j in (await (await client.get("/jobs", params={"status": "queued"})).json())["jobs"]}
    assert listed == monitors, (listed, monitors)
    await client.post(f"/jobs/{blocker['id']}/cancel")
