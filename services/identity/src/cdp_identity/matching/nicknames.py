"""Name variants: given names and the nicknames people put on forms instead ("Bob" for "Robert").

Two names are variants when they share a group. A name can sit in several groups ("Chris" is short for
Christopher and Christine), so lookups return a set of group numbers. Names are stored normalised
(lower case, no accents), the form `normalise_name` produces.
"""

from __future__ import annotations

from functools import cache

# Each line: the formal name first, then its common short and pet forms.
_GROUPS = """
abigail abby abbie gail
albert al bert bertie
alexander alex alec sasha xander
alexandra alex alexa sandra sandy lexi
alexis lexi lexie
alfred al alf fred freddie
allison ally allie
amanda mandy manda
andrew andy drew
angela angie
anthony tony ant
arthur art artie
barbara barb barbie babs
benjamin ben benny benji
beverly bev
bradley brad
catherine cathy kate katie cat
charles charlie chuck chas chaz
charlotte charlie lottie
christina tina chris chrissy
christine chris chrissy tina
christopher chris kit topher
cynthia cindy
daniel dan danny
danielle dani
david dave davey
deborah deb debbie debby
debra deb debbie
dennis denny
donald don donnie
dorothy dot dottie dolly
douglas doug
edward ed eddie ted teddy ned
elizabeth liz beth betty lizzie eliza betsy libby
emily em emmy
evelyn evie eve
frances fran frankie
francis frank frankie
frederick fred freddie
gabriel gabe
gerald jerry gerry
gregory greg
harold harry hal
henry hank harry
isabella bella izzy
jacob jake
jacqueline jackie
james jim jimmy jamie
jeffrey jeff
jennifer jen jenny jenn
jessica jess jessie
jonathan jon jonny
john jack johnny jon
joseph joe joey
joshua josh
judith judy
katherine kate katie kathy kat kit
kathleen kathy kate katie
kathryn kathy kate katie
kenneth ken kenny
kimberly kim kimmy
lawrence larry lars
madison maddie maddy
margaret maggie peggy meg megan marge madge
matthew matt matty
melissa missy mel
michael mike mikey mick
nathan nate
nathaniel nate nat
nicholas nick nicky
nicole nikki nic
olivia liv livvy
pamela pam
patricia pat patty trish tricia
patrick pat paddy
peter pete
philip phil
raymond ray
rebecca becky becca
richard rick rich dick ricky richie
robert bob rob bobby robbie bert
ronald ron ronnie
russell russ
samantha sam sammy
samuel sam sammy
sandra sandy
sophia sophie
stephanie steph stephie
stephen steve stevie
steven steve stevie
susan sue susie suzy
teresa terry tess tessa
theresa terry tess tessa
theodore ted teddy theo
thomas tom tommy
timothy tim timmy
valerie val
victoria vicky tori vic
vincent vince vinny
virginia ginny ginger
walter walt wally
william bill will billy willie liam
zachary zach zack
"""


def _build_index() -> dict[str, frozenset[int]]:
    index: dict[str, set[int]] = {}
    for group_number, line in enumerate(line for line in _GROUPS.splitlines() if line.strip()):
        for name in line.split():
            index.setdefault(name, set()).add(group_number)
    return {name: frozenset(groups) for name, groups in index.items()}


_INDEX = _build_index()


@cache
def name_groups(name: str) -> frozenset[int]:
    """The variant groups a normalised given name belongs to (empty when it has no known variants)."""
    return _INDEX.get(name, frozenset())


def are_name_variants(left: str, right: str) -> bool:
    """True when two different normalised names are known variants of each other ("bob", "robert")."""
    return left != right and not name_groups(left).isdisjoint(name_groups(right))
