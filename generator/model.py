"""The demand and review model: pure, vectorised functions of a seed and a date.

Expected order lines of a SKU in a store on a day are a product of factors::

    lines = popularity[sku] * store_size[store] * weekday[dow] * yearly[sku](doy)
            * trend[sku](date) * promo_lift[sku](date) * holiday(date)

and the realised lines are gamma-Poisson (over-dispersed) around it. Popularity
is log-normal with a long tail (many SKUs sell on few days), cheaper SKUs sell
more, weekends are higher, each SKU has a yearly peak (its category's season)
and its own trend, promotions (random per-SKU windows) lower the price and lift
demand through a price elasticity, and a fixed list of holidays (Black Friday,
Christmas, ...) lifts or dampens every SKU. A few percent of lines are returns
(negative quantity), more for low-quality SKUs. About one line in 30 leads to a
review, whose rating follows the SKU's latent quality and whose text follows
the rating (:mod:`generator.text`).

Determinism: the catalog and the promotion calendar come from generators seeded
with ``(seed, stream, sku)`` (so SKU ``i`` is the same whatever ``skus`` is, and
history and live share it), a day's events from one seeded with ``(seed,
stream, day)``, so a day's events do not depend on the window they are part of.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from datetime import date, timedelta
from typing import TypeVar

import numpy as np

from generator.text import CATEGORIES, review_text
from lambdalake.calendar import nth_weekday
from lambdalake.errors import InvalidInput

T = TypeVar("T")

DAY_MS = 86_400_000
ORDINAL_1970 = date(1970, 1, 1).toordinal()
TREND_ORIGIN = date(2024, 1, 1)
PROMO_EPOCH = date(2000, 1, 3)  # a Monday; promotion slots are counted from it
PROMO_SLOT_DAYS = 42

# Seed streams (the second element of every seed tuple), one per kind of draw.
CATALOG_STREAM, STORE_STREAM, PROMO_STREAM, DAY_STREAM, NAME_STREAM, ANOMALY_STREAM = (
    1,
    2,
    3,
    4,
    5,
    6,
)

# Monday .. Sunday; weekends clearly higher.
WEEKDAY_FACTOR = np.array([0.88, 0.84, 0.88, 0.94, 1.08, 1.42, 1.28])
# Share of a day's events per UTC hour (shops and web shops, several time zones).
HOUR_WEIGHTS = np.array(
    [2, 1.5, 1, 1, 1, 1.5, 2.5, 4, 5.5, 6.5, 7, 7.5, 8, 7.5, 7, 7, 7.5, 8, 8.5, 8, 7, 5.5, 4, 3],
    dtype=float,
)
HOUR_P = HOUR_WEIGHTS / HOUR_WEIGHTS.sum()
MEAN_POPULARITY = 4.2  # expected lines per SKU per average store per plain day
REVIEW_RATE = 1 / 30  # reviews per (non-return) order line
CURRENCY_OMITTED_RATE = 0.08
DISCOUNTS = np.array([0.10, 0.15, 0.20, 0.25, 0.30, 0.40])

# How an event time is written: epoch milliseconds, UTC "Z", the store's offset
# with milliseconds, or the store's offset to the second.
TIME_EPOCH_MS, TIME_Z, TIME_OFFSET_MS, TIME_OFFSET_S = 0, 1, 2, 3
TIME_FORMAT_P = np.array([0.15, 0.20, 0.45, 0.20])
STORE_OFFSETS_MIN = np.array([60, -300, 0, -480, -360, 120, 330, -240, 540, 600])
# Store j sits in a city of its UTC offset (STORE_OFFSETS_MIN[j % 10]), in that city's region.
STORE_CITIES: tuple[tuple[str, ...], ...] = (
    ("Berlin", "Paris", "Amsterdam"),
    ("New York", "Boston", "Atlanta"),
    ("London", "Dublin", "Lisbon"),
    ("Los Angeles", "Seattle", "San Francisco"),
    ("Chicago", "Dallas", "Minneapolis"),
    ("Helsinki", "Athens", "Bucharest"),
    ("Mumbai", "Bangalore", "Delhi"),
    ("San Juan", "Caracas", "La Paz"),
    ("Tokyo", "Seoul", "Osaka"),
    ("Brisbane", "Vladivostok", "Port Moresby"),
)
STORE_REGIONS = (
    "Europe",
    "North America East",
    "Europe",
    "North America West",
    "North America Central",
    "Europe",
    "Asia-Pacific",
    "Latin America",
    "Asia-Pacific",
    "Asia-Pacific",
)
REGIONS = tuple(dict.fromkeys(STORE_REGIONS))
STORE_KINDS = ("Central", "Mall", "Outlet", "Station")
# Product lines: a SKU's name is "<brand> <line> <product>" (a rename picks another line).
PRODUCT_LINES = ("Classic", "Pro", "Lite", "Max", "Essential", "Everyday", "Plus", "Studio")


@dataclass(frozen=True)
class Catalog:
    """SKUs and stores with their latent attributes (arrays indexed by SKU or store)."""

    seed: int
    sku: list[str]
    category: np.ndarray  # int, index into generator.text.CATEGORIES
    product: list[str]
    base_price: np.ndarray  # regular unit price
    popularity: np.ndarray  # expected lines per store of size 1 per plain day
    quality: np.ndarray  # latent quality in (0, 1); drives ratings and returns
    return_rate: np.ndarray
    pack_p: np.ndarray  # geometric parameter of units per line (cheap => more units)
    season_amp: np.ndarray
    season_peak: np.ndarray  # day of year
    trend: np.ndarray  # log growth per year
    elasticity: np.ndarray  # demand lift = (1 - discount) ** -elasticity
    store_id: list[str]
    store_size: np.ndarray
    store_offset_min: np.ndarray  # the store's UTC offset, used to write event times
    name: list[str]  # "<brand> <line> <product>"
    brand: list[str]
    store_name: list[str]
    store_city: list[str]
    store_region: list[str]

    @property
    def n_skus(self) -> int:
        return len(self.sku)

    @property
    def n_stores(self) -> int:
        return len(self.store_id)

    def category_name(self, i: int) -> str:
        return CATEGORIES[int(self.category[i])].name


def _price_point(x: float) -> float:
    """Retail price points: 4.99, 12.49, 129.00 ..."""
    if x < 20:
        return round(max(0.49, np.floor(x) + (0.49 if x % 1 < 0.5 else 0.99)), 2)
    if x < 200:
        return round(np.floor(x) + 0.99, 2)
    return float(round(x, -1) - 0.01)


def make_catalog(seed: int, skus: int, stores: int) -> Catalog:
    """The catalog of ``skus`` SKUs and ``stores`` stores for ``seed``."""
    if skus < 1 or stores < 1:
        raise InvalidInput("skus and stores must be at least 1")
    cat, product, price, pop, quality, pack, amp, peak, trend, elast = ([] for _ in range(10))
    names, brands = [], []
    for i in range(skus):
        rng = np.random.default_rng([seed, CATALOG_STREAM, i])
        c = int(rng.integers(len(CATEGORIES)))
        spec = CATEGORIES[c]
        p = _price_point(spec.median_price * float(np.exp(rng.normal(0.0, 0.6))))
        cat.append(c)
        product.append(spec.products[int(rng.integers(len(spec.products)))])
        price.append(p)
        # Log-normal popularity, a long tail; expensive SKUs sell less.
        sigma = 1.6
        rel_price = p / spec.median_price
        pop.append(
            MEAN_POPULARITY
            * spec.demand
            * float(np.exp(rng.normal(-(sigma**2) / 2, sigma)))
            * rel_price**-0.5
        )
        quality.append(float(rng.beta(5.0, 2.0)))
        pack.append(float(np.clip(0.45 + 0.12 * np.log(p), 0.5, 0.97)))
        amp.append(float(rng.uniform(0.05, 0.4)))
        peak.append(spec.peak_day_of_year + float(rng.normal(0, 12)))
        trend.append(float(rng.normal(0.05, 0.15)))
        elast.append(float(rng.uniform(1.5, 3.0)))
        # Names from a stream of their own: the demand draws above stay as they were.
        names_rng = np.random.default_rng([seed, NAME_STREAM, i])
        brand = spec.brands[int(names_rng.integers(len(spec.brands)))]
        line = PRODUCT_LINES[int(names_rng.integers(len(PRODUCT_LINES)))]
        brands.append(brand)
        names.append(f"{brand} {line} {product[-1]}")
    sizes, offsets, store_names, cities, regions = [], [], [], [], []
    for j in range(stores):
        rng = np.random.default_rng([seed, STORE_STREAM, j])
        sizes.append(float(np.exp(rng.normal(-0.125, 0.5))))
        k, n = j % len(STORE_OFFSETS_MIN), j // len(STORE_OFFSETS_MIN)
        offsets.append(int(STORE_OFFSETS_MIN[k]))
        city = STORE_CITIES[k][n % len(STORE_CITIES[k])]
        kind = STORE_KINDS[(n // len(STORE_CITIES[k])) % len(STORE_KINDS)]
        rounds = n // (len(STORE_CITIES[k]) * len(STORE_KINDS))
        cities.append(city)
        regions.append(STORE_REGIONS[k])
        store_names.append(f"{city} {kind}" + (f" {rounds + 1}" if rounds else ""))
    q = np.array(quality)
    return Catalog(
        seed=seed,
        sku=[f"SKU-{i + 1:05d}" for i in range(skus)],
        category=np.array(cat, dtype=np.int64),
        product=product,
        base_price=np.array(price),
        popularity=np.array(pop),
        quality=q,
        return_rate=0.01 + 0.07 * (1 - q),
        pack_p=np.array(pack),
        season_amp=np.array(amp),
        season_peak=np.array(peak),
        trend=np.array(trend),
        elasticity=np.array(elast),
        store_id=[f"S{j + 1:03d}" for j in range(stores)],
        store_size=np.array(sizes),
        store_offset_min=np.array(offsets, dtype=np.int64),
        name=names,
        brand=brands,
        store_name=store_names,
        store_city=cities,
        store_region=regions,
    )


# --- reference data (topics ``products`` and ``stores``) -----------------------------------


def product_record(catalog: Catalog, i: int) -> dict[str, object]:
    """The ``products`` message of SKU ``i`` as the catalog has it (keyed by ``sku``)."""
    return {
        "sku": catalog.sku[i],
        "category": catalog.category_name(i),
        "name": catalog.name[i],
        "brand": catalog.brand[i],
    }


def store_record(catalog: Catalog, j: int) -> dict[str, object]:
    """The ``stores`` message of store ``j`` (keyed by ``store_id``)."""
    return {
        "store_id": catalog.store_id[j],
        "region": catalog.store_region[j],
        "name": catalog.store_name[j],
        "city": catalog.store_city[j],
    }


# --- calendar ----------------------------------------------------------------------------


def holidays(year: int) -> dict[date, float]:
    """The fixed holiday list of a year: date -> demand multiplier."""
    thanksgiving = nth_weekday(year, 11, 3, 4)
    out = {
        date(year, 1, 1): 0.55,
        date(year, 2, 14): 1.15,
        nth_weekday(year, 5, 0, -1): 1.2,  # Memorial Day
        date(year, 7, 4): 1.25,
        nth_weekday(year, 9, 0, 1): 1.2,  # Labor Day
        thanksgiving: 0.7,
        thanksgiving + timedelta(days=1): 2.6,  # Black Friday
        thanksgiving + timedelta(days=2): 1.6,
        thanksgiving + timedelta(days=3): 1.4,
        thanksgiving + timedelta(days=4): 1.9,  # Cyber Monday
        date(year, 12, 24): 1.3,
        date(year, 12, 25): 0.25,
        date(year, 12, 26): 1.6,
    }
    for day in range(10, 24):  # the Christmas run-up, rising
        out[date(year, 12, day)] = 1.25 + 0.04 * (day - 10)
    for day in range(27, 32):
        out[date(year, 12, day)] = 1.15
    return out


def holiday_factor(days: list[date]) -> np.ndarray:
    """Demand multiplier of each day (1.0 on ordinary days)."""
    cache: dict[int, dict[date, float]] = {}
    out = np.ones(len(days))
    for k, d in enumerate(days):
        table = cache.get(d.year)
        if table is None:
            table = cache[d.year] = holidays(d.year)
        out[k] = table.get(d, 1.0)
    return out


def promo_discount(catalog: Catalog, days: list[date]) -> np.ndarray:
    """Discount (0 = no promotion) of each SKU on each day: shape (days, skus).

    Each SKU has at most one promotion per 6-week slot (about half the slots),
    3-14 days long, 10-40 % off; slots are counted from a fixed epoch so a
    date's promotions do not depend on the requested window.
    """
    out = np.zeros((len(days), catalog.n_skus))
    if not days:
        return out
    offsets = np.array([(d - PROMO_EPOCH).days for d in days])
    first_slot, last_slot = offsets.min() // PROMO_SLOT_DAYS, offsets.max() // PROMO_SLOT_DAYS
    for slot in range(int(first_slot), int(last_slot) + 1):
        base = slot * PROMO_SLOT_DAYS
        for i in range(catalog.n_skus):
            rng = np.random.default_rng([catalog.seed, PROMO_STREAM, i, slot + 1_000_000])
            has, length, start_u, disc = (
                rng.random(),
                rng.integers(3, 15),
                rng.random(),
                rng.integers(len(DISCOUNTS)),
            )
            if has >= 0.5:
                continue
            start = base + int(start_u * (PROMO_SLOT_DAYS - length))
            mask = (offsets >= start) & (offsets < start + length)
            out[mask, i] = DISCOUNTS[disc]
    return out


def expected_lines(catalog: Catalog, days: list[date]) -> np.ndarray:
    """Expected order lines per (day, sku, store): shape (days, skus, stores)."""
    dow = np.array([d.weekday() for d in days])
    doy = np.array([d.timetuple().tm_yday for d in days], dtype=float)
    years = np.array([(d - TREND_ORIGIN).days / 365.25 for d in days])
    yearly = 1 + catalog.season_amp[None, :] * np.cos(
        2 * np.pi * (doy[:, None] - catalog.season_peak[None, :]) / 365.25
    )
    trend = np.clip(np.exp(catalog.trend[None, :] * years[:, None]), 0.3, 3.0)
    discount = promo_discount(catalog, days)
    lift = (1 - discount) ** -catalog.elasticity[None, :]
    per_sku = (
        catalog.popularity[None, :]
        * WEEKDAY_FACTOR[dow][:, None]
        * yearly
        * trend
        * lift
        * holiday_factor(days)[:, None]
    )
    return per_sku[:, :, None] * catalog.store_size[None, None, :]


# --- events ------------------------------------------------------------------------------


@dataclass
class OrderLines:
    """Order lines as columns (one element per line)."""

    event_id: list[str]
    time_ms: np.ndarray  # epoch milliseconds, UTC
    time_format: np.ndarray  # TIME_* code
    sku_idx: np.ndarray
    store_idx: np.ndarray
    quantity: np.ndarray
    unit_price: np.ndarray
    has_currency: np.ndarray  # False: the optional field is omitted

    def __len__(self) -> int:
        return len(self.event_id)


@dataclass
class Reviews:
    """Reviews as columns (one element per review)."""

    review_id: list[str]
    time_ms: np.ndarray
    time_format: np.ndarray
    sku_idx: np.ndarray
    store_idx: np.ndarray  # only to write the event time in the store's offset
    rating: np.ndarray
    title: list[str | None]
    text: list[str]
    customer_id: list[str | None]

    def __len__(self) -> int:
        return len(self.review_id)


def uuids(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` random (version 4) UUID strings drawn from ``rng``."""
    if n == 0:
        return []
    b = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    b[:, 6] = (b[:, 6] & 0x0F) | 0x40
    b[:, 8] = (b[:, 8] & 0x3F) | 0x80
    h = b.tobytes().hex()
    return [
        f"{h[k : k + 8]}-{h[k + 8 : k + 12]}-{h[k + 12 : k + 16]}-{h[k + 16 : k + 20]}-{h[k + 20 : k + 32]}"
        for k in range(0, 32 * n, 32)
    ]


def times_in_day(rng: np.random.Generator, day: date, n: int) -> np.ndarray:
    """``n`` epoch-millisecond times within ``day`` (UTC), following the hourly profile."""
    start = (day.toordinal() - ORDINAL_1970) * DAY_MS
    hours = rng.choice(24, size=n, p=HOUR_P)
    return start + hours * 3_600_000 + rng.integers(0, 3_600_000, size=n)


def time_formats(rng: np.random.Generator, time_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A writing format per event, and the times truncated to what that format keeps."""
    fmt = rng.choice(len(TIME_FORMAT_P), size=len(time_ms), p=TIME_FORMAT_P)
    t = np.where(fmt == TIME_OFFSET_S, time_ms - time_ms % 1000, time_ms)
    return fmt, t


def order_lines(
    catalog: Catalog,
    day: date,
    sku_idx: np.ndarray,
    store_idx: np.ndarray,
    time_ms: np.ndarray,
    rng: np.random.Generator,
    discount: np.ndarray | None = None,
) -> OrderLines:
    """Quantities, prices and ids of the given lines of ``day`` (one per index pair).

    ``discount`` (per SKU) is that day's promotion; computed when not given.
    """
    n = len(sku_idx)
    if discount is None:
        discount = promo_discount(catalog, [day])[0]
    units = np.minimum(rng.geometric(catalog.pack_p[sku_idx]), 12)
    is_return = rng.random(n) < catalog.return_rate[sku_idx]
    # Returns are mostly single units.
    quantity = np.where(is_return, -np.minimum(units, rng.integers(1, 3, size=n)), units)
    price = np.round(catalog.base_price[sku_idx] * (1 - discount[sku_idx]), 2)
    fmt, t = time_formats(rng, time_ms)
    return OrderLines(
        event_id=uuids(rng, n),
        time_ms=t,
        time_format=fmt,
        sku_idx=sku_idx,
        store_idx=store_idx,
        quantity=quantity.astype(np.int64),
        unit_price=price,
        has_currency=rng.random(n) >= CURRENCY_OMITTED_RATE,
    )


def ratings(catalog: Catalog, sku_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Star ratings 1-5 around each SKU's latent quality (noisy, skewed to 4-5 like real ones).

    Some buyers get a defective unit (more often for low-quality SKUs) and give one
    star, which makes the distribution J-shaped as real review data is.
    """
    q = catalog.quality[sku_idx]
    latent = 0.6 + 4.8 * q + rng.normal(0.0, 1.0, size=len(sku_idx))
    defective = rng.random(len(sku_idx)) < 0.02 + 0.15 * (1 - q)
    return np.where(defective, 1, np.clip(np.rint(latent), 1, 5)).astype(np.int64)


def reviews(
    catalog: Catalog,
    sku_idx: np.ndarray,
    store_idx: np.ndarray,
    time_ms: np.ndarray,
    rng: np.random.Generator,
) -> Reviews:
    """Reviews of the given SKUs at the given times: rating from quality, text from rating."""
    n = len(sku_idx)
    rating = ratings(catalog, sku_idx, rng)
    fmt, t = time_formats(rng, time_ms)
    has_customer = rng.random(n) < 0.75
    customer = rng.integers(1, 10_000_000, size=n)
    rnd = random.Random(int(rng.integers(2**62)))
    titles: list[str | None] = []
    texts: list[str] = []
    for r, s in zip(rating.tolist(), sku_idx.tolist(), strict=True):
        title, text = review_text(r, int(catalog.category[s]), catalog.product[s], rnd)
        titles.append(title)
        texts.append(text)
    return Reviews(
        review_id=uuids(rng, n),
        time_ms=t,
        time_format=fmt,
        sku_idx=sku_idx,
        store_idx=store_idx,
        rating=rating,
        title=titles,
        text=texts,
        customer_id=[
            f"C{c:07d}" if h else None
            for c, h in zip(customer.tolist(), has_customer.tolist(), strict=True)
        ],
    )


@dataclass
class DayEvents:
    day: date
    orders: OrderLines
    reviews: Reviews
    expected: np.ndarray  # expected lines per (sku, store), for tests and diagnostics
    discount: np.ndarray  # promotion discount per SKU


def day_rng(seed: int, day: date, stream: int = DAY_STREAM) -> np.random.Generator:
    """The generator of one day's draws (independent of the requested window)."""
    return np.random.default_rng([seed, stream, day.toordinal()])


def generate_day(
    catalog: Catalog,
    day: date,
    expected: np.ndarray | None = None,
    discount: np.ndarray | None = None,
) -> DayEvents:
    """Every order line and review of ``day``, each sorted by event time.

    ``expected`` (skus x stores) and ``discount`` (per SKU) may be passed in when
    precomputed for a window; they are computed otherwise.
    """
    if expected is None:
        expected = expected_lines(catalog, [day])[0]
    if discount is None:
        discount = promo_discount(catalog, [day])[0]
    rng = day_rng(catalog.seed, day)
    # Gamma-Poisson: day-to-day variation beyond Poisson noise (shape 4).
    lam = expected * rng.gamma(4.0, 0.25, size=expected.shape)
    counts = rng.poisson(lam)
    flat = np.repeat(np.arange(counts.size), counts.ravel())
    sku_idx, store_idx = np.divmod(flat, catalog.n_stores)
    t = times_in_day(rng, day, len(flat))
    order = np.argsort(t, kind="stable")
    lines = order_lines(catalog, day, sku_idx[order], store_idx[order], t[order], rng, discount)
    # About one sale in 30 is reviewed, later the same day.
    reviewed = (rng.random(len(lines)) < REVIEW_RATE) & (lines.quantity > 0)
    r_sku, r_store = lines.sku_idx[reviewed], lines.store_idx[reviewed]
    day_end = (day.toordinal() - ORDINAL_1970 + 1) * DAY_MS
    r_t = lines.time_ms[reviewed]
    r_t = r_t + ((day_end - r_t) * rng.random(len(r_t))).astype(np.int64)
    r_order = np.argsort(r_t, kind="stable")
    revs = reviews(catalog, r_sku[r_order], r_store[r_order], r_t[r_order], rng)
    return DayEvents(day, lines, revs, expected, discount)


# --- writing events ------------------------------------------------------------------------


def format_times(time_ms: np.ndarray, fmt: np.ndarray, offset_min: np.ndarray) -> list[str | int]:
    """Event times as the contract allows them: RFC 3339 with an offset, or epoch ms."""
    n = len(time_ms)
    if n == 0:
        return []
    offset = np.where(fmt == TIME_Z, 0, offset_min)
    local = (time_ms + offset * 60_000).astype("datetime64[ms]")
    with_ms = np.datetime_as_string(local, unit="ms").tolist()
    sign = np.where(offset < 0, "-", "+")
    a = np.abs(offset)
    suffix = [
        f"{s}{h:02d}:{m:02d}"
        for s, h, m in zip(sign.tolist(), (a // 60).tolist(), (a % 60).tolist(), strict=True)
    ]
    out: list[str | int] = []
    for t, f, s, suf in zip(time_ms.tolist(), fmt.tolist(), with_ms, suffix, strict=True):
        if f == TIME_EPOCH_MS:
            out.append(t)
        elif f == TIME_Z:
            out.append(s + "Z")
        elif f == TIME_OFFSET_MS:
            out.append(s + suf)
        else:
            out.append(s[:-4] + suf)
    return out


def order_dicts(catalog: Catalog, lines: OrderLines) -> list[dict[str, object]]:
    """The ``orders`` events as JSON-ready dicts (contract field order)."""
    times = format_times(
        lines.time_ms, lines.time_format, catalog.store_offset_min[lines.store_idx]
    )
    skus, stores = catalog.sku, catalog.store_id
    out: list[dict[str, object]] = []
    for eid, t, s, st, q, p, c in zip(
        lines.event_id,
        times,
        lines.sku_idx.tolist(),
        lines.store_idx.tolist(),
        lines.quantity.tolist(),
        lines.unit_price.tolist(),
        lines.has_currency.tolist(),
        strict=True,
    ):
        d: dict[str, object] = {
            "event_id": eid,
            "event_time": t,
            "store_id": stores[st],
            "sku": skus[s],
            "quantity": q,
            "unit_price": p,
        }
        if c:
            d["currency"] = "USD"
        out.append(d)
    return out


def review_dicts(catalog: Catalog, revs: Reviews) -> list[dict[str, object]]:
    """The ``reviews`` events as JSON-ready dicts (optional fields omitted when absent)."""
    times = format_times(revs.time_ms, revs.time_format, catalog.store_offset_min[revs.store_idx])
    skus = catalog.sku
    out: list[dict[str, object]] = []
    for rid, t, s, r, title, text, cust in zip(
        revs.review_id,
        times,
        revs.sku_idx.tolist(),
        revs.rating.tolist(),
        revs.title,
        revs.text,
        revs.customer_id,
        strict=True,
    ):
        d: dict[str, object] = {"review_id": rid, "event_time": t, "sku": skus[s], "rating": r}
        if title is not None:
            d["title"] = title
        d["text"] = text
        if cust is not None:
            d["customer_id"] = cust
        out.append(d)
    return out


# --- injected demand anomalies (live only) ---------------------------------------------------

ANOMALY_SLOT_HOURS = 6  # one anomaly per slot of the UTC day: four a day
ANOMALY_START_HOURS = 2.0  # it starts within the first two hours of its slot
ANOMALY_MINUTES = (20.0, 40.0)
# Extra lines = factor x the series' expected lines of the whole day. Big on purpose: the
# forecast's 95 % bound of a few-lines-a-day series is 3-5 x its forecast (units per line
# vary, days vary), so a burst of 5-10 days' lines is barely past it and ranks among the
# day's ordinary exceedances; 12-20 days' lines is clearly past it.
ANOMALY_FACTOR = (12.0, 20.0)
ANOMALY_MIN_LINES = 20
# The series is drawn from those ranked in the top 20-40 % by expected lines that day: busy
# enough to have a forecast worth the name, not the biggest (whose bursts would swamp the
# day's total).
ANOMALY_RANKS = (0.2, 0.4)


@dataclass(frozen=True)
class Anomaly:
    """A burst of one series: ``lines`` extra order lines spread over ``[start_ms, end_ms)``,
    ``factor`` times the series' expected lines of the whole day."""

    sku_idx: int
    store_idx: int
    start_ms: int
    end_ms: int
    factor: float
    lines: int


def anomalies(catalog: Catalog, day: date, expected: np.ndarray | None = None) -> list[Anomaly]:
    """The demand anomalies the live generator injects on ``day``: one per 6-hour slot (UTC),
    starting in the slot's first two hours, each a series ranked in the day's top 20-40 % by
    expected lines selling 12-20 times its expected lines of the whole day (at least 20 extra
    lines) within 20-40 minutes. Deterministic from ``(seed, day)``."""
    if expected is None:
        expected = expected_lines(catalog, [day])[0]
    flat = expected.ravel()
    ranked = np.argsort(-flat, kind="stable")
    lo = int(len(flat) * ANOMALY_RANKS[0])
    top = ranked[lo : max(lo + 1, int(len(flat) * ANOMALY_RANKS[1]))]
    rng = day_rng(catalog.seed, day, ANOMALY_STREAM)
    day_start = (day.toordinal() - ORDINAL_1970) * DAY_MS
    out = []
    for slot in range(24 // ANOMALY_SLOT_HOURS):
        cell = int(top[int(rng.integers(len(top)))])
        start = day_start + slot * ANOMALY_SLOT_HOURS * 3_600_000
        start += int(rng.uniform(0, ANOMALY_START_HOURS) * 3_600_000)
        minutes = float(rng.uniform(*ANOMALY_MINUTES))
        factor = float(rng.uniform(*ANOMALY_FACTOR))
        lines = max(ANOMALY_MIN_LINES, round(factor * float(flat[cell])))
        sku, store = divmod(cell, catalog.n_stores)
        end = start + int(minutes * 60_000)
        out.append(Anomaly(sku, store, start, end, factor, lines))
    return out


# A stock-out: one of the day's busiest series (top 5 % by expected lines, so its forecast's
# lower bound is well above zero) sells nothing from an early hour (01:00-04:00 UTC) to the end
# of the day. The alerts name it late in the day (`below_lower_95`, after 75 % of the day).
STOCKOUT_STREAM = 7
STOCKOUT_RANKS = 0.05
STOCKOUT_START_HOURS = (1.0, 4.0)


@dataclass(frozen=True)
class Stockout:
    """Series ``(sku_idx, store_idx)`` sells nothing from ``start_ms`` to the end of the day."""

    sku_idx: int
    store_idx: int
    start_ms: int


def stockout(
    catalog: Catalog,
    day: date,
    expected: np.ndarray | None = None,
    bursts: list[Anomaly] | None = None,
) -> Stockout:
    """The stock-out the live generator injects on ``day`` (deterministic from the seed and
    the day; a series that is not also one of the day's bursts, ``bursts`` when the caller
    has them)."""
    if expected is None:
        expected = expected_lines(catalog, [day])[0]
    if bursts is None:
        bursts = anomalies(catalog, day, expected)
    flat = expected.ravel()
    ranked = np.argsort(-flat, kind="stable")
    burst_cells = {a.sku_idx * catalog.n_stores + a.store_idx for a in bursts}
    top = [
        int(c)
        for c in ranked[: max(1, int(len(flat) * STOCKOUT_RANKS))]
        if int(c) not in burst_cells
    ]
    rng = day_rng(catalog.seed, day, STOCKOUT_STREAM)
    cell = top[int(rng.integers(len(top)))] if top else int(ranked[0])
    start = (day.toordinal() - ORDINAL_1970) * DAY_MS
    start += int(rng.uniform(*STOCKOUT_START_HOURS) * 3_600_000)
    sku, store = divmod(cell, catalog.n_stores)
    return Stockout(sku, store, start)


def anomaly_lines(
    catalog: Catalog, day: date, found: list[Anomaly], discount: np.ndarray | None = None
) -> OrderLines:
    """The order lines of ``day``'s anomalies, sorted by time (ids drawn from the day's
    anomaly stream, so a restarted live generator sends the same events again)."""
    rng = np.random.default_rng([catalog.seed, ANOMALY_STREAM, day.toordinal(), 1])
    none = np.zeros(0, dtype=np.int64)
    sku = np.concatenate([np.full(a.lines, a.sku_idx, dtype=np.int64) for a in found] or [none])
    store = np.concatenate([np.full(a.lines, a.store_idx, dtype=np.int64) for a in found] or [none])
    t = np.concatenate([rng.integers(a.start_ms, a.end_ms, size=a.lines) for a in found] or [none])
    order = np.argsort(t, kind="stable")
    return order_lines(
        catalog,
        day,
        sku[order].astype(np.int64),
        store[order].astype(np.int64),
        t[order].astype(np.int64),
        rng,
        discount,
    )


def take(columns: T, index: np.ndarray) -> T:
    """The rows ``index`` of an :class:`OrderLines` or :class:`Reviews`."""
    picked: dict[str, object] = {}
    for f in fields(columns):  # type: ignore[arg-type]
        v = getattr(columns, f.name)
        picked[f.name] = v[index] if isinstance(v, np.ndarray) else [v[i] for i in index.tolist()]
    return type(columns)(**picked)


def concat(a: T, b: T) -> T:
    """Rows of ``a`` then rows of ``b`` (the same class)."""
    joined: dict[str, object] = {}
    for f in fields(a):  # type: ignore[arg-type]
        x, y = getattr(a, f.name), getattr(b, f.name)
        joined[f.name] = np.concatenate([x, y]) if isinstance(x, np.ndarray) else x + y
    return type(a)(**joined)
