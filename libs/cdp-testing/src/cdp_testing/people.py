"""Synthetic person records with realistic noise and known truth, for record-matching tests and benchmarks.

`generate_population(n_people)` draws people (US-style names, addresses, phones and e-mails with skewed,
census-like frequencies, so common surnames and big cities collide the way real data does), lets some of
them share a household (same surname, address and sometimes the landline: the hard non-matches), and
writes one record per person plus, for a share of people, extra records with the noise that
data entry and system migrations produce: typos, nicknames, swapped first/last names, missing values,
address abbreviations, phone formatting, e-mail variants or a different e-mail, day/month swaps in the
date of birth, people who moved. The truth maps each record id to its person key.
"""

from __future__ import annotations

import itertools
import random
import string
import unicodedata
from dataclasses import dataclass, replace
from datetime import date, timedelta

FIELDS = ("first_name", "last_name", "email", "phone", "dob", "city", "zip", "address")

# Common first names, most frequent first, with the nicknames people actually use on forms.
_MALE_NAMES: dict[str, tuple[str, ...]] = {
    "James": ("Jim", "Jimmy", "Jamie"),
    "Robert": ("Bob", "Rob", "Bobby"),
    "John": ("Jack", "Johnny"),
    "Michael": ("Mike", "Mikey"),
    "David": ("Dave", "Davey"),
    "William": ("Bill", "Will", "Billy"),
    "Richard": ("Rick", "Rich", "Dick"),
    "Joseph": ("Joe", "Joey"),
    "Thomas": ("Tom", "Tommy"),
    "Christopher": ("Chris",),
    "Charles": ("Charlie", "Chuck"),
    "Daniel": ("Dan", "Danny"),
    "Matthew": ("Matt",),
    "Anthony": ("Tony",),
    "Mark": (),
    "Donald": ("Don",),
    "Steven": ("Steve",),
    "Andrew": ("Andy", "Drew"),
    "Paul": (),
    "Joshua": ("Josh",),
    "Kenneth": ("Ken", "Kenny"),
    "Kevin": (),
    "Brian": (),
    "George": (),
    "Timothy": ("Tim",),
    "Ronald": ("Ron",),
    "Jason": (),
    "Edward": ("Ed", "Eddie", "Ted"),
    "Jeffrey": ("Jeff",),
    "Ryan": (),
    "Jacob": ("Jake",),
    "Gary": (),
    "Nicholas": ("Nick",),
    "Eric": (),
    "Jonathan": ("Jon",),
    "Stephen": ("Steve",),
    "Larry": (),
    "Justin": (),
    "Scott": (),
    "Brandon": (),
    "Benjamin": ("Ben",),
    "Samuel": ("Sam",),
    "Gregory": ("Greg",),
    "Alexander": ("Alex",),
    "Patrick": ("Pat",),
    "Frank": (),
    "Raymond": ("Ray",),
    "Jack": (),
    "Dennis": (),
    "Jerry": (),
    "Tyler": (),
    "Aaron": (),
    "José": (),
    "Adam": (),
    "Nathan": ("Nate",),
    "Henry": ("Hank",),
    "Zachary": ("Zach",),
    "Douglas": ("Doug",),
    "Peter": ("Pete",),
    "Kyle": (),
    "Noah": (),
    "Ethan": (),
    "Jeremy": (),
    "Christian": (),
    "Walter": ("Walt",),
    "Keith": (),
    "Austin": (),
    "Roger": (),
    "Terry": (),
    "Sean": (),
    "Gerald": ("Jerry",),
    "Carl": (),
    "Dylan": (),
    "Harold": ("Harry",),
    "Jordan": (),
    "Jesse": (),
    "Bryan": (),
    "Lawrence": ("Larry",),
    "Arthur": ("Art",),
    "Gabriel": ("Gabe",),
    "Bruce": (),
    "Logan": (),
    "Billy": (),
    "Joe": (),
    "Alan": (),
    "Juan": (),
    "Elijah": (),
    "Willie": (),
    "Albert": ("Al",),
    "Wayne": (),
    "Randy": (),
    "Mason": (),
    "Vincent": ("Vince",),
    "Liam": (),
    "Roy": (),
    "Bobby": (),
    "Caleb": (),
    "Bradley": ("Brad",),
    "Russell": ("Russ",),
    "Lucas": (),
    "François": (),
    "Søren": (),
}
_FEMALE_NAMES: dict[str, tuple[str, ...]] = {
    "Mary": (),
    "Patricia": ("Pat", "Patty", "Trish"),
    "Jennifer": ("Jen", "Jenny"),
    "Linda": (),
    "Elizabeth": ("Liz", "Beth", "Betty", "Lizzie"),
    "Barbara": ("Barb",),
    "Susan": ("Sue", "Susie"),
    "Jessica": ("Jess",),
    "Sarah": (),
    "Karen": (),
    "Lisa": (),
    "Nancy": (),
    "Betty": (),
    "Sandra": ("Sandy",),
    "Margaret": ("Maggie", "Peggy", "Meg"),
    "Ashley": (),
    "Kimberly": ("Kim",),
    "Emily": (),
    "Donna": (),
    "Michelle": (),
    "Carol": (),
    "Amanda": ("Mandy",),
    "Melissa": ("Missy",),
    "Deborah": ("Deb", "Debbie"),
    "Stephanie": ("Steph",),
    "Dorothy": ("Dot",),
    "Rebecca": ("Becky",),
    "Sharon": (),
    "Laura": (),
    "Cynthia": ("Cindy",),
    "Amy": (),
    "Kathleen": ("Kathy",),
    "Angela": ("Angie",),
    "Shirley": (),
    "Brenda": (),
    "Emma": (),
    "Anna": (),
    "Pamela": ("Pam",),
    "Nicole": ("Nikki",),
    "Samantha": ("Sam",),
    "Katherine": ("Kate", "Katie", "Kathy"),
    "Christine": ("Chris", "Chrissy"),
    "Helen": (),
    "Debra": ("Deb",),
    "Rachel": (),
    "Carolyn": (),
    "Janet": (),
    "Maria": (),
    "Catherine": ("Cathy", "Kate"),
    "Heather": (),
    "Diane": (),
    "Olivia": ("Liv",),
    "Julie": (),
    "Joyce": (),
    "Victoria": ("Vicky", "Tori"),
    "Ruth": (),
    "Virginia": ("Ginny",),
    "Lauren": (),
    "Kelly": (),
    "Christina": ("Tina", "Chris"),
    "Joan": (),
    "Evelyn": ("Evie",),
    "Judith": ("Judy",),
    "Andrea": (),
    "Hannah": (),
    "Megan": (),
    "Cheryl": (),
    "Jacqueline": ("Jackie",),
    "Martha": (),
    "Madison": ("Maddie",),
    "Teresa": ("Terry",),
    "Gloria": (),
    "Sara": (),
    "Janice": (),
    "Ann": (),
    "Kathryn": ("Kathy", "Katie"),
    "Abigail": ("Abby",),
    "Sophia": ("Sophie",),
    "Frances": ("Fran",),
    "Jean": (),
    "Alice": (),
    "Judy": (),
    "Isabella": ("Bella",),
    "Julia": (),
    "Grace": (),
    "Amber": (),
    "Denise": (),
    "Danielle": ("Dani",),
    "Marilyn": (),
    "Beverly": ("Bev",),
    "Charlotte": ("Charlie",),
    "Natalie": (),
    "Theresa": ("Tess",),
    "Diana": (),
    "Brittany": (),
    "Doris": (),
    "Kayla": (),
    "Alexis": ("Lexi",),
    "Lori": (),
    "Renée": (),
    "Zoë": (),
    "María": (),
    "Chloé": (),
}


# The most common US surnames (census order); their weights fall off like the real distribution.
def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_COMMON_SURNAMES = _words("""
Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez Wilson Anderson
Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez Clark Ramirez Lewis Robinson Walker Young
Allen King Wright Scott Torres Nguyen Hill Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter
Roberts Gomez Phillips Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris Morales Murphy Cook Rogers
Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward Richardson Watson Brooks Chavez
Wood James Bennett Gray Mendoza Ruiz Hughes Price Alvarez Castillo Sanders Patel Myers Long Ross Foster Jimenez
Powell Jenkins Perry Russell Sullivan Bell Coleman Butler Henderson Barnes Gonzales Fisher Vasquez Simmons Romero
Jordan Patterson Alexander Hamilton Graham Reynolds Griffin Wallace Moreno West Cole Hayes Bryant Herrera Gibson
Ellis Tran Medina Aguilar Stevens Murray Ford Castro Marshall Owens Harrison Fernandez McDonald Woods Washington
Kennedy Wells Vargas Henry Chen Freeman Webb Tucker Guzman Burns Crawford Olson Simpson Porter Hunter Gordon Mendez
Silva Shaw Snyder Mason Dixon Muñoz Hunt Hicks Holmes Palmer Wagner Black Robertson Boyd Rose Stone Salazar Fox
Warren Mills Meyer Rice Schmidt Garza Daniels Ferguson Nichols Stephens Soto Weaver Ryan Gardner Payne Grant Dunn
Kelley Spencer Hawkins Arnold Pierce Vazquez Hansen Peters Santos Hart Bradley Knight Elliott Cunningham Duncan
Armstrong Hudson Carroll Lane Riley Andrews Alvarado Ray Delgado Berry Perkins Hoffman Johnston Matthews Peña
Richards Willis Carpenter Lawrence Sandoval Guerrero George Chapman Rios Estrada Ortega Watkins Greene Núñez
Wheeler Valdez Harper Burke Larson Santiago Maldonado Morrison Franklin Carlson Austin Dominguez Carr Lawson Jacobs
O'Brien Lynch Singh Vega Bishop Montgomery Oliver Jensen Harvey Williamson Gilbert Dean Sims Espinoza Howell Li
Wong Reid Hanson Le McCoy Garrett Burton Fuller Wang Weber Welch Rojas Lucas Marquez Fields Park Yang Little Banks
Padilla Day Walsh Bowman Schultz Luna Fowler Mejia Davidson Acosta Brewer May Holland Juarez Newman Pearson Curtis
Cortez Douglas Schneider Joseph Barrett Navarro Figueroa Keller Ávila Wade Molina Stanley Hopkins Campos Barnett
Bates Chambers Caldwell Beck Lambert Miranda Byrd Craig Ayala Lowe Frazier Powers Neal Leonard Gregory Carrillo
Sutton Fleming Rhodes Shelton Schwartz Norris Jennings Watts Duran Walters Cohen McDaniel Moran Parks Steele Vaughn
Becker Holt DeLeon Barker Terry Hale Leon Hail Benson Haynes Horton Miles Lyons Pham Graves Bush Thornton Wolfe
Warner Cabrera McKinney Mann Zimmerman Dawson Lara Fletcher Page McCarthy Love Robles Cervantes Solis Erickson Reeves
Chang Klein Salinas Fuentes Baldwin Daniel Simon Velasquez Hardy Higgins Aguirre Lin Cummings Chandler Sharp Barber
Bowen Ochoa Dennis Robbins Liu Ramsey Francis Griffith Paul Blair O'Connor Cardenas Pacheco Cross Calderon Quinn
Moss Swanson Chan Rivas Khan Rodgers Serrano Fitzgerald Rosales Stevenson Christensen Manning Gill Curry McLaughlin
Harmon McGee Gross Doyle Garner Newton Burgess Reese Walton Blake Trujillo Adkins Brady Goodman Roman Webster
Goodwin Fischer Huang Potter Delacruz Montoya Todd Wu Hines Mullins Castaneda Malone Cannon Tate Mack Sherman Hubbard
Hodges Zhang Guerra Wolf Valencia Saunders Franco Rowe Gallagher Farmer Hammond Hampton Townsend Ingram Wise Gallegos
Clarke Barton Schroeder Maxwell Waters Logan Camacho Strickland Norman Person Colon Parsons Frank Harrington Glover
Osborne Buchanan Casey Floyd Patton Ibarra Ball Tyler Suarez Bowers Orozco Salas Cobb Gibbs Andrade Bauer Conner
Moody Escobar McGuire Lloyd Mueller Hartman French Kramer McBride Pope Lindsey Velazquez Norton McCormick Sparks
Flynn Yates Hogan Marsh Macias Villanueva Zamora Pratt Stokes Owen Ballard Lang Brock Villarreal Charles Drake Barrera
Cain Patrick Piña Blackwell Lamb Müller Schäfer D'Angelo
""")

# Syllables for the long tail of rare surnames that every real population has.
_RARE_ONSETS = ("br", "k", "v", "st", "m", "d", "h", "w", "l", "t", "r", "g", "p", "z", "sch", "kr", "fl", "n")
_RARE_VOWELS = ("a", "e", "i", "o", "u", "ei", "ou", "ie", "au")
_RARE_CODAS = ("n", "rt", "ll", "ck", "ss", "nd", "r", "m", "ff", "tz", "s", "x")
_RARE_ENDINGS = ("son", "berg", "ski", "ley", "ton", "man", "er", "ez", "ini", "ova", "ard", "well", "")

# Cities with a population share, a 3-digit zip prefix and area codes.
_CITIES: tuple[tuple[str, float, str, tuple[str, ...]], ...] = (
    ("New York", 8.3, "100", ("212", "646", "917")),
    ("Los Angeles", 3.9, "900", ("213", "310", "323")),
    ("Chicago", 2.7, "606", ("312", "773")),
    ("Houston", 2.3, "770", ("713", "281", "832")),
    ("Phoenix", 1.6, "850", ("602", "480")),
    ("Philadelphia", 1.6, "191", ("215", "267")),
    ("San Antonio", 1.5, "782", ("210",)),
    ("San Diego", 1.4, "921", ("619", "858")),
    ("Dallas", 1.3, "752", ("214", "469", "972")),
    ("San Jose", 1.0, "951", ("408", "669")),
    ("Austin", 0.96, "787", ("512", "737")),
    ("Jacksonville", 0.95, "322", ("904",)),
    ("Fort Worth", 0.92, "761", ("817", "682")),
    ("Columbus", 0.9, "432", ("614",)),
    ("Charlotte", 0.87, "282", ("704", "980")),
    ("San Francisco", 0.87, "941", ("415", "628")),
    ("Indianapolis", 0.87, "462", ("317",)),
    ("Seattle", 0.74, "981", ("206",)),
    ("Denver", 0.71, "802", ("303", "720")),
    ("Washington", 0.69, "200", ("202",)),
    ("Boston", 0.68, "021", ("617", "857")),
    ("El Paso", 0.68, "799", ("915",)),
    ("Nashville", 0.67, "372", ("615", "629")),
    ("Detroit", 0.67, "482", ("313",)),
    ("Oklahoma City", 0.65, "731", ("405",)),
    ("Portland", 0.65, "972", ("503", "971")),
    ("Las Vegas", 0.64, "891", ("702", "725")),
    ("Memphis", 0.65, "381", ("901",)),
    ("Louisville", 0.62, "402", ("502",)),
    ("Baltimore", 0.6, "212", ("410", "443")),
    ("Milwaukee", 0.59, "532", ("414",)),
    ("Albuquerque", 0.56, "871", ("505",)),
    ("Tucson", 0.55, "857", ("520",)),
    ("Fresno", 0.53, "937", ("559",)),
    ("Sacramento", 0.51, "958", ("916",)),
    ("Kansas City", 0.49, "641", ("816",)),
    ("Atlanta", 0.5, "303", ("404", "470", "678")),
    ("Miami", 0.47, "331", ("305", "786")),
    ("Raleigh", 0.47, "276", ("919", "984")),
    ("Omaha", 0.47, "681", ("402", "531")),
    ("Minneapolis", 0.43, "554", ("612",)),
    ("Tulsa", 0.41, "741", ("918",)),
    ("Cleveland", 0.38, "441", ("216",)),
    ("New Orleans", 0.39, "701", ("504",)),
    ("Pittsburgh", 0.3, "152", ("412",)),
    ("Saint Louis", 0.3, "631", ("314",)),
    ("Cincinnati", 0.3, "452", ("513",)),
    ("Buffalo", 0.26, "142", ("716",)),
    ("Boise", 0.23, "837", ("208",)),
    ("Spokane", 0.22, "992", ("509",)),
    ("Des Moines", 0.21, "503", ("515",)),
    ("Salt Lake City", 0.2, "841", ("801", "385")),
    ("Providence", 0.19, "029", ("401",)),
    ("Burlington", 0.05, "054", ("802",)),
)

_STREET_NAMES = _words(
    "Main Oak Pine Maple Cedar Elm Washington Lake Hill Park View Sunset Lincoln Jefferson Madison Franklin "
    "Highland Forest Jackson River Church Spring Ridge Meadow Walnut Chestnut Willow Lakeview Cherry Adams "
    "Center Mill North South Union Broad Market Water Prospect Bridge Grove Valley Railroad Liberty Kennedy "
    "Magnolia Dogwood Hickory Sycamore Birch Laurel Cypress Aspen Juniper Poplar Spruce Harbor Bayview Summit "
    "Orchard Garden Fairview Woodland Greenwood Riverside Hillcrest Lexington Jamestown Wilshire Beacon Canal"
)
_NUMBERED_STREETS = ("1st", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th", "9th", "10th", "12th", "14th", "21st")
_STREET_TYPES = {  # full form -> abbreviations seen in real data
    "Street": ("St", "St.", "Str"),
    "Avenue": ("Ave", "Ave.", "Av"),
    "Road": ("Rd", "Rd."),
    "Boulevard": ("Blvd", "Blvd."),
    "Drive": ("Dr", "Dr."),
    "Lane": ("Ln",),
    "Court": ("Ct",),
    "Place": ("Pl",),
    "Way": ("Wy",),
    "Terrace": ("Ter",),
}
_STREET_TYPE_WEIGHTS = (30, 22, 14, 6, 10, 7, 5, 3, 2, 1)
_UNIT_FORMS = ("Apt {}", "Apt. {}", "#{}", "Unit {}", "Apartment {}", "Ste {}")

_EMAIL_DOMAINS = (
    ("gmail.com", 34),
    ("yahoo.com", 14),
    ("hotmail.com", 9),
    ("outlook.com", 8),
    ("icloud.com", 7),
    ("aol.com", 4),
    ("comcast.net", 3),
    ("msn.com", 2),
    ("att.net", 2),
    ("protonmail.com", 1),
    ("acme-corp.com", 2),
    ("globex.com", 1),
    ("initech.com", 1),
)

_KEYBOARD_NEIGHBOURS = {
    "a": "qwsz",
    "b": "vghn",
    "c": "xdfv",
    "d": "serfcx",
    "e": "wsdr",
    "f": "drtgvc",
    "g": "ftyhbv",
    "h": "gyujnb",
    "i": "ujko",
    "j": "huikmn",
    "k": "jiolm",
    "l": "kop",
    "m": "njk",
    "n": "bhjm",
    "o": "iklp",
    "p": "ol",
    "q": "wa",
    "r": "edft",
    "s": "awedxz",
    "t": "rfgy",
    "u": "yhji",
    "v": "cfgb",
    "w": "qase",
    "x": "zsdc",
    "y": "tghu",
    "z": "asx",
}


@dataclass(frozen=True)
class Person:
    """The truth about one person; records are noisy renderings of it."""

    key: str
    first_name: str
    last_name: str
    dob: date
    email: str | None
    phone_digits: str | None  # 10 digits, area code first
    house_number: int
    street: str  # e.g. "Maple Avenue"
    unit: str | None
    city: str
    zip: str


@dataclass(frozen=True)
class NoiseRates:
    """How often each kind of noise hits a duplicate record (each field independently)."""

    typo: float = 0.08
    nickname: float = 0.15
    swapped_names: float = 0.03
    missing: float = 0.10
    email_variant: float = 0.12
    different_email: float = 0.15
    phone_format: float = 0.6
    different_phone: float = 0.12
    dob_swap: float = 0.04
    dob_component_typo: float = 0.04
    address_variant: float = 0.5
    moved: float = 0.08


class _PopulationGenerator:
    def __init__(self, rng: random.Random, noise: NoiseRates) -> None:
        self.rng = rng
        self.noise = noise
        self.first_names = [(name, "m") for name in _MALE_NAMES] + [(name, "f") for name in _FEMALE_NAMES]
        # Zipf-like popularity by rank, male and female lists interleaved so both sexes are equally common.
        self.first_name_weights = [1 / (rank + 8) for rank in range(len(_MALE_NAMES))] + [
            1 / (rank + 8) for rank in range(len(_FEMALE_NAMES))
        ]
        self.nicknames = {**_MALE_NAMES, **_FEMALE_NAMES}
        self.surname_weights = [1 / (rank + 2) ** 0.5 for rank in range(len(_COMMON_SURNAMES))]
        self.rare_surnames = self._invent_rare_surnames(4000)
        self.city_weights = [share for _, share, _, _ in _CITIES]
        self.city_zips = {
            name: [f"{prefix}{n:02d}" for n in rng.sample(range(1, 99), k=min(60, max(3, int(share * 12))))]
            for name, share, prefix, _ in _CITIES
        }
        self.used_emails: set[str] = set()

    def _invent_rare_surnames(self, count: int) -> list[str]:
        names: set[str] = set()
        while len(names) < count:
            parts = [self.rng.choice(_RARE_ONSETS), self.rng.choice(_RARE_VOWELS), self.rng.choice(_RARE_CODAS)]
            names.add(("".join(parts) + self.rng.choice(_RARE_ENDINGS)).capitalize())
        return sorted(names)

    # --- people -------------------------------------------------------------------------------------------

    def person(self, key: str) -> Person:
        rng = self.rng
        first_name, _ = rng.choices(self.first_names, weights=self.first_name_weights)[0]
        # About a third of people carry a surname outside the common list: the long tail.
        if rng.random() < 0.35:
            last_name = rng.choice(self.rare_surnames)
        else:
            last_name = rng.choices(_COMMON_SURNAMES, weights=self.surname_weights)[0]
        city, _, _, area_codes = rng.choices(_CITIES, weights=self.city_weights)[0]
        return Person(
            key=key,
            first_name=first_name,
            last_name=last_name,
            dob=self._birth_date(),
            email=self._email(first_name, last_name) if rng.random() < 0.9 else None,
            phone_digits=self._phone(area_codes) if rng.random() < 0.88 else None,
            house_number=self._house_number(),
            street=self._street(),
            unit=self._unit(),
            city=city,
            zip=rng.choice(self.city_zips[city]),
        )

    def housemate(self, key: str, of: Person) -> Person:
        """Someone living with `of`: same address, usually the same surname, sometimes the same landline."""
        rng = self.rng
        fresh = self.person(key)
        last_name = of.last_name if rng.random() < 0.85 else fresh.last_name
        first_name = fresh.first_name
        while first_name == of.first_name:
            first_name = rng.choices(self.first_names, weights=self.first_name_weights)[0][0]
        return replace(
            fresh,
            first_name=first_name,
            last_name=last_name,
            email=self._email(first_name, last_name) if rng.random() < 0.9 else None,
            phone_digits=of.phone_digits if rng.random() < 0.3 else fresh.phone_digits,
            house_number=of.house_number,
            street=of.street,
            unit=of.unit,
            city=of.city,
            zip=of.zip,
        )

    def _birth_date(self) -> date:
        return date(1935, 1, 1) + timedelta(days=self.rng.randrange(0, 365 * 72))

    def _email(self, first_name: str, last_name: str) -> str:
        rng = self.rng
        first, last = _ascii_login(first_name), _ascii_login(last_name)
        domain = rng.choices([d for d, _ in _EMAIL_DOMAINS], weights=[w for _, w in _EMAIL_DOMAINS])[0]
        for attempt in itertools.count():
            pattern = rng.randrange(7)
            if pattern == 0:
                login = f"{first}.{last}"
            elif pattern == 1:
                login = f"{first}{last}"
            elif pattern == 2:
                login = f"{first[0]}{last}"
            elif pattern == 3:
                login = f"{first}_{last}"
            elif pattern == 4:
                login = f"{first}.{last}{rng.randrange(1, 99)}"
            elif pattern == 5:
                login = f"{last}.{first}"
            else:
                login = f"{first}{rng.randrange(1950, 2010)}"
            if attempt > 3:
                login += str(rng.randrange(100, 999))
            address = f"{login}@{domain}"
            # Providers ignore dots in the mailbox name, so two people never get addresses that differ
            # only by dots: a real address belongs to one person.
            mailbox = f"{login.replace('.', '')}@{domain}"
            if mailbox not in self.used_emails:
                self.used_emails.add(mailbox)
                return address
        raise AssertionError("unreachable")

    def _phone(self, area_codes: tuple[str, ...]) -> str:
        rng = self.rng
        return f"{rng.choice(area_codes)}{rng.randrange(200, 999)}{rng.randrange(0, 10000):04d}"

    def _house_number(self) -> int:
        # Benford-ish: small house numbers are far more common than large ones.
        return int(10 ** self.rng.uniform(0, 4)) or 1

    def _street(self) -> str:
        rng = self.rng
        name = rng.choice(_NUMBERED_STREETS) if rng.random() < 0.15 else rng.choice(_STREET_NAMES)
        street_type = rng.choices(list(_STREET_TYPES), weights=_STREET_TYPE_WEIGHTS)[0]
        return f"{name} {street_type}"

    def _unit(self) -> str | None:
        rng = self.rng
        if rng.random() > 0.2:
            return None
        return f"{rng.randrange(1, 30)}{rng.choice(['', '', 'A', 'B', 'C'])}"

    # --- records ------------------------------------------------------------------------------------------

    def clean_record(self, person: Person) -> dict:
        """The first record of a person: correct, in one system's usual formatting, a few gaps."""
        rng = self.rng
        return {
            "first_name": person.first_name,
            "last_name": person.last_name,
            "email": person.email,
            "phone": _format_phone(person.phone_digits, 0) if person.phone_digits else None,
            "dob": person.dob.isoformat() if rng.random() > 0.03 else None,
            "city": person.city,
            "zip": person.zip,
            "address": _format_address(person, style=0) if rng.random() > 0.04 else None,
        }

    def noisy_record(self, person: Person) -> dict:
        """Another record of the same person, as a different system or a later form captured it."""
        rng, noise = self.rng, self.noise
        if rng.random() < noise.moved:
            moved = self.person(person.key)
            person = replace(
                person,
                house_number=moved.house_number,
                street=moved.street,
                unit=moved.unit,
                city=moved.city,
                zip=moved.zip,
                phone_digits=moved.phone_digits if rng.random() < 0.5 else person.phone_digits,
            )
        first_name, last_name = person.first_name, person.last_name
        if rng.random() < noise.nickname and self.nicknames.get(first_name):
            first_name = rng.choice(self.nicknames[first_name])
        first_name = self._maybe_typo(first_name)
        last_name = self._maybe_typo(last_name)
        first_name, last_name = _maybe_fold_accents(rng, first_name), _maybe_fold_accents(rng, last_name)
        if rng.random() < 0.05:
            first_name, last_name = first_name.upper(), last_name.upper()
        if rng.random() < noise.swapped_names:
            first_name, last_name = last_name, first_name
        record = {
            "first_name": first_name,
            "last_name": last_name,
            "email": self._noisy_email(person),
            "phone": self._noisy_phone(person),
            "dob": self._noisy_dob(person.dob),
            "city": self._noisy_city(person.city),
            "zip": self._maybe_typo(person.zip, digits=True),
            "address": self._noisy_address(person),
        }
        for field in FIELDS:
            if rng.random() < noise.missing * (0.4 if field in ("first_name", "last_name") else 1.0):
                record[field] = rng.choice([None, ""])
        return record

    def _maybe_typo(self, value: str, *, digits: bool = False) -> str:
        if self.rng.random() >= self.noise.typo or len(value) < 2:
            return value
        return _typo(self.rng, value, digits=digits)

    def _noisy_email(self, person: Person) -> str | None:
        rng, noise = self.rng, self.noise
        if person.email is None or rng.random() < noise.different_email:
            # A work address, a new provider, or an address the other system never had.
            return self._email(person.first_name, person.last_name) if rng.random() < 0.8 else None
        email = person.email
        if rng.random() < noise.email_variant:
            login, domain = email.split("@")
            variant = rng.randrange(3)
            if variant == 0:
                email = email.upper() if rng.random() < 0.3 else email.capitalize()
            elif variant == 1 and "." in login:
                email = f"{login.replace('.', '')}@{domain}"
            elif variant == 1:
                email = f"{login}+shop@{domain}"
            else:
                email = f" {email} "
        elif rng.random() < noise.typo / 2:
            login, domain = email.split("@")
            email = f"{_typo(rng, login)}@{domain}"
        return email

    def _noisy_phone(self, person: Person) -> str | None:
        rng, noise = self.rng, self.noise
        digits = person.phone_digits
        if digits is None or rng.random() < noise.different_phone:
            area_codes = next(codes for name, _, _, codes in _CITIES if name == person.city)
            return _format_phone(self._phone(area_codes), rng.randrange(6)) if rng.random() < 0.7 else None
        if rng.random() < noise.typo / 2:
            digits = _typo(rng, digits, digits=True, substitute_only=True)
        style = rng.randrange(1, 6) if rng.random() < noise.phone_format else 0
        return _format_phone(digits, style)

    def _noisy_dob(self, dob: date) -> str | None:
        rng, noise = self.rng, self.noise
        roll = rng.random()
        if roll < noise.dob_swap and dob.day <= 12 and dob.day != dob.month:
            return f"{dob.year:04d}-{dob.day:02d}-{dob.month:02d}"
        if roll < noise.dob_swap + noise.dob_component_typo:
            component = rng.randrange(3)
            if component == 0:
                return f"{dob.year + rng.choice([-10, -1, 1, 10]):04d}-{dob.month:02d}-{dob.day:02d}"
            if component == 1:
                return f"{dob.year:04d}-{(dob.month % 12) + 1:02d}-{min(dob.day, 28):02d}"
            day = min(28, max(1, dob.day + rng.choice([-1, 1, 10, -10])))
            return f"{dob.year:04d}-{dob.month:02d}-{day:02d}"
        return dob.isoformat()

    def _noisy_city(self, city: str) -> str:
        rng = self.rng
        city = self._maybe_typo(city) if rng.random() < 0.5 else city
        if rng.random() < 0.1:
            city = city.upper()
        if city.startswith("Saint ") and rng.random() < 0.5:
            city = "St. " + city.removeprefix("Saint ")
        return city

    def _noisy_address(self, person: Person) -> str:
        rng = self.rng
        style = rng.randrange(1, 6) if rng.random() < self.noise.address_variant else 0
        address = _format_address(person, style=style, rng=rng)
        return self._maybe_typo(address)


def _format_phone(digits: str, style: int) -> str:
    area, exchange, line = digits[:3], digits[3:6], digits[6:]
    return (
        f"({area}) {exchange}-{line}",
        f"{area}-{exchange}-{line}",
        f"+1 {area} {exchange} {line}",
        f"{area}{exchange}{line}",
        f"{area}.{exchange}.{line}",
        f"1-{area}-{exchange}-{line}",
    )[style]


def _format_address(person: Person, *, style: int, rng: random.Random | None = None) -> str:
    """Render the address; style 0 is the canonical form, the others are what other systems write."""
    name, street_type = person.street.rsplit(" ", 1)
    number = str(person.house_number)
    unit_form = "Apt {}"
    if style and rng is not None:
        if rng.random() < 0.6:
            street_type = rng.choice(_STREET_TYPES[street_type])
        unit_form = rng.choice(_UNIT_FORMS)
        if rng.random() < 0.15:
            number = f"{number},"
        if style == 3:
            name, street_type = name.lower(), street_type.lower()
        if style == 4:
            name, street_type = name.upper(), street_type.upper()
    address = f"{number} {name} {street_type}"
    if person.unit and not (style == 5 and rng is not None and rng.random() < 0.6):
        address += f" {unit_form.format(person.unit)}"
    return address


def _typo(rng: random.Random, value: str, *, digits: bool = False, substitute_only: bool = False) -> str:
    """One keyboard slip: insert, delete, substitute or transpose a character."""
    position = rng.randrange(len(value))
    operation = "substitute" if substitute_only else rng.choice(["insert", "delete", "substitute", "transpose"])

    def replacement(char: str) -> str:
        if digits:
            return rng.choice(string.digits.replace(char, "") if char in string.digits else string.digits)
        neighbours = _KEYBOARD_NEIGHBOURS.get(char.lower(), string.ascii_lowercase)
        new = rng.choice(neighbours)
        return new.upper() if char.isupper() else new

    if operation == "insert":
        return value[:position] + replacement(value[position]) + value[position:]
    if operation == "delete" and len(value) > 2:
        return value[:position] + value[position + 1 :]
    if operation == "transpose" and position < len(value) - 1 and value[position] != value[position + 1]:
        return value[:position] + value[position + 1] + value[position] + value[position + 2 :]
    return value[:position] + replacement(value[position]) + value[position + 1 :]


def _ascii_login(name: str) -> str:
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum())


def _maybe_fold_accents(rng: random.Random, name: str) -> str:
    if name.isascii() or rng.random() < 0.5:
        return name
    return unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()


def generate_population(
    n_people: int,
    *,
    duplicates_rate: float = 0.3,
    household_rate: float = 0.08,
    max_duplicates: int = 3,
    noise: NoiseRates | None = None,
    seed: int = 0,
) -> tuple[list[dict], dict[str, str]]:
    """`n_people` people as records; `duplicates_rate` of them get 1..`max_duplicates` extra noisy records.

    `household_rate` of people share an address (and usually a surname) with an earlier person: different
    people that look alike. Returns (records, truth): records are dicts with an "id" and the person fields
    (missing values are None or ""), in shuffled order; truth maps record id -> person key. Same seed, same
    output.
    """
    if n_people < 0:
        raise ValueError(f"n_people must be >= 0, got {n_people}")
    if not 0 <= duplicates_rate <= 1:
        raise ValueError(f"duplicates_rate must be within [0, 1], got {duplicates_rate}")
    rng = random.Random(seed)
    generator = _PopulationGenerator(rng, noise or NoiseRates())
    people: list[Person] = []
    for index in range(n_people):
        key = f"p{index:06d}"
        if people and rng.random() < household_rate:
            people.append(generator.housemate(key, rng.choice(people)))
        else:
            people.append(generator.person(key))

    rendered: list[tuple[dict, str]] = []
    for person in people:
        rendered.append((generator.clean_record(person), person.key))
        if rng.random() < duplicates_rate:
            # Mostly one extra record, sometimes a few (a person who signed up in several systems).
            extra = min(max_duplicates, 1 + int(rng.expovariate(2.0)))
            rendered.extend((generator.noisy_record(person), person.key) for _ in range(extra))
    rng.shuffle(rendered)

    records, truth = [], {}
    for index, (fields, person_key) in enumerate(rendered):
        record_id = f"r{index:07d}"
        records.append({"id": record_id, **fields})
        truth[record_id] = person_key
    return records, truth


def true_pairs(truth: dict[str, str]) -> set[tuple[str, str]]:
    """Every pair of record ids that belong to the same person, as (smaller id, larger id)."""
    by_person: dict[str, list[str]] = {}
    for record_id, person_key in truth.items():
        by_person.setdefault(person_key, []).append(record_id)
    pairs: set[tuple[str, str]] = set()
    for record_ids in by_person.values():
        pairs.update(itertools.combinations(sorted(record_ids), 2))
    return pairs
