"""Linux: the kernel's thermal zones under /sys/class/thermal and their trip points."""

from pathlib import Path

from yem.hardware.thermal.reading import Reading, ThermalState

SYSFS_THERMAL = Path("/sys/class/thermal")
TRIP_STATES = {"passive": ThermalState.FAIR, "hot": ThermalState.SERIOUS, "critical": ThermalState.CRITICAL}
NEAR_CRITICAL_C = 5.0  # the kernel powers off at the critical trip: this close is already serious


def zone_state(celsius: float, trips: list[tuple[str, float]]) -> ThermalState:
    """One zone against its trip points (type, °C): passive → fair, hot → serious, critical → critical.
    Active trips only start fans, so they are ignored."""
    state = ThermalState.NOMINAL
    for kind, limit in trips:
        if kind in TRIP_STATES and celsius >= limit:
            state = max(state, TRIP_STATES[kind])
        if kind == "critical" and celsius >= limit - NEAR_CRITICAL_C:
            state = max(state, ThermalState.SERIOUS)
    return state


class SysfsSensor:
    """The hottest enabled thermal zone relative to its trip points; unknown when there are none."""

    def __init__(self, root: Path = SYSFS_THERMAL):
        self.root = root

    def read(self) -> Reading:
        zones = [zone for zone in map(_read_zone, sorted(self.root.glob("thermal_zone*"))) if zone is not None]
        if not zones:
            return Reading(ThermalState.UNKNOWN, "sysfs", f"no readable thermal zone in {self.root}")
        name, celsius, trips = max(zones, key=lambda z: (zone_state(z[1], z[2]), z[1]))
        state = zone_state(celsius, trips)
        limits = ", ".join(f"{kind} {limit:.0f} °C" for kind, limit in trips if kind in TRIP_STATES)
        return Reading(state, "sysfs", f"{name} {celsius:.0f} °C" + (f" (trips: {limits})" if limits else ""),
                       celsius)


def _read_zone(zone: Path) -> tuple[str, float, list[tuple[str, float]]] | None:
    """(type, °C, [(trip type, °C)]) of a zone, or None when disabled or unreadable (values are in m°C)."""
    try:
        if (zone / "mode").exists() and (zone / "mode").read_text().strip() == "disabled":
            return None
        celsius = int((zone / "temp").read_text()) / 1000
        name = (zone / "type").read_text().strip() if (zone / "type").exists() else zone.name
        trips = []
        for trip in sorted(zone.glob("trip_point_*_temp")):
            limit = int(trip.read_text()) / 1000
            kind = trip.with_name(trip.name.replace("_temp", "_type")).read_text().strip()
            if limit > 0:  # firmware reports 0 or negative values for unused trips
                trips.append((kind, limit))
    except (OSError, ValueError):  # sensors that are off answer EIO/ENODATA
        return None
    return name, celsius, trips
