"""The one round loop every caller runs: measure, refit, and the rounds the refit asks for, within the bound."""

from harp.driver import drive_rounds, partition_ranges


def _loop(plans: list[list[int]], max_rounds: int) -> tuple[list, list, list]:
    measured, refits = [], []

    def measure(leaves):
        measured.append(list(leaves))

    def refit(number):
        refits.append(number)
        return plans[number] if number < len(plans) else []

    rounds = drive_rounds([1, 2], measure, refit, max_rounds=max_rounds)
    return measured, refits, rounds


def test_representatives_then_each_planned_round_then_stop():
    measured, refits, rounds = _loop([[7], [8, 9], []], max_rounds=5)
    assert measured == [[1, 2], [7], [8, 9]]
    assert refits == [0, 1, 2]  # a refit after every measurement; the last one plans nothing
    assert [(r.number, r.leaves) for r in rounds] == [(0, [1, 2]), (1, [7]), (2, [8, 9])]


def test_the_round_bound_stops_after_a_refit():
    measured, refits, rounds = _loop([[7], [8], [9]], max_rounds=1)
    assert measured == [[1, 2], [7]] and refits == [0, 1] and len(rounds) == 2
    measured, refits, _ = _loop([[7]], max_rounds=0)
    assert measured == [[1, 2]] and refits == [0]


def test_partition_ranges_follow_the_registry_order():
    assert partition_ranges(["a", "b", "c", "d"], {"d", "a", "c"}) == [("a", "a"), ("c", "d")]
