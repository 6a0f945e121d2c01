"""Generate lorart's bundled default data set (deterministic; run it to rebuild the JSONL files).

Task: answer every question as one line `ANSWER: <short answer> | CONFIDENCE: high|medium|low`
(high = settled fact, medium = estimate, low = unknowable or a matter of taste). SmolLM2-135M-
Instruct never does this by default, and a format like this is learned in a few dozen LoRA steps.

Files written next to this script:
  train.jsonl    chat records {"messages": [...]} (some with two question/answer turns)
  heldout.jsonl  chat records whose subjects (countries, elements, ...) never appear in train
  general.jsonl  {"text"} paragraphs of plain prose for a forgetting / perplexity check
"""
import json
import os
import random

SEED = 1234
HELDOUT_EVERY = 9  # every 9th subject group (after a seeded shuffle) is held out

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasília"),
    ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"), ("Russia", "Moscow"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Switzerland", "Bern"),
    ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"), ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Colombia", "Bogotá"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"),
    ("Morocco", "Rabat"), ("Ethiopia", "Addis Ababa"), ("Ghana", "Accra"), ("Cuba", "Havana"),
    ("Iceland", "Reykjavik"), ("New Zealand", "Wellington"), ("Pakistan", "Islamabad"),
    ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Croatia", "Zagreb"),
    ("Serbia", "Belgrade"), ("Venezuela", "Caracas"),
]
ELEMENTS = [
    ("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("copper", "Cu"), ("sodium", "Na"),
    ("potassium", "K"), ("lead", "Pb"), ("tin", "Sn"), ("mercury", "Hg"), ("oxygen", "O"),
    ("hydrogen", "H"), ("carbon", "C"), ("nitrogen", "N"), ("helium", "He"), ("neon", "Ne"),
    ("calcium", "Ca"), ("magnesium", "Mg"), ("zinc", "Zn"), ("sulfur", "S"), ("chlorine", "Cl"),
    ("uranium", "U"), ("tungsten", "W"), ("platinum", "Pt"), ("nickel", "Ni"), ("aluminium", "Al"),
    ("silicon", "Si"), ("phosphorus", "P"), ("iodine", "I"), ("lithium", "Li"), ("argon", "Ar"),
]
OPPOSITES = [
    ("hot", "cold"), ("tall", "short"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("wet", "dry"),
    ("loud", "quiet"), ("rich", "poor"), ("young", "old"), ("strong", "weak"), ("thick", "thin"),
    ("buy", "sell"), ("push", "pull"), ("win", "lose"), ("above", "below"), ("inside", "outside"),
    ("first", "last"), ("ancient", "modern"), ("smooth", "rough"), ("cheap", "expensive"),
    ("arrive", "depart"), ("accept", "refuse"), ("increase", "decrease"), ("remember", "forget"),
    ("noisy", "silent"), ("narrow", "wide"),
]
BABY_ANIMALS = [
    ("dog", "puppy"), ("cat", "kitten"), ("cow", "calf"), ("horse", "foal"), ("bear", "cub"),
    ("sheep", "lamb"), ("chicken", "chick"), ("duck", "duckling"), ("frog", "tadpole"),
    ("kangaroo", "joey"), ("deer", "fawn"), ("goat", "kid"), ("pig", "piglet"), ("swan", "cygnet"),
    ("goose", "gosling"), ("owl", "owlet"), ("eagle", "eaglet"), ("hare", "leveret"), ("lion", "cub"),
]
UNITS = [  # (question template, factor, answer unit)
    ("How many minutes are in {n} hours?", 60, "minutes"),
    ("How many seconds are in {n} minutes?", 60, "seconds"),
    ("How many centimeters are in {n} meters?", 100, "centimeters"),
    ("How many meters are in {n} kilometers?", 1000, "meters"),
    ("How many days are in {n} weeks?", 7, "days"),
    ("How many hours are in {n} days?", 24, "hours"),
    ("How many grams are in {n} kilograms?", 1000, "grams"),
    ("How many months are in {n} years?", 12, "months"),
    ("How many eggs are in {n} dozen?", 12, "eggs"),
]
ESTIMATES = [  # (question, paraphrase, answer)
    ("How long does it take to walk 5 kilometers?", "About how long is a 5 km walk?", "about 1 hour"),
    ("How long does it take to hard-boil an egg?", "How many minutes should I boil an egg for it to be hard?", "about 10 minutes"),
    ("How many hours of sleep does an adult need each night?", "How much sleep should a grown-up get per night?", "about 7 to 9 hours"),
    ("How many words are in a typical novel?", "Roughly how long is an average novel in words?", "about 80,000 words"),
    ("How long is a flight from London to New York?", "How many hours does it take to fly from London to New York?", "about 8 hours"),
    ("How many people live on Earth?", "What is the world population, roughly?", "about 8 billion"),
    ("How long does it take to read a 300-page book?", "How many hours would a 300-page book take to read?", "about 10 hours"),
    ("How long does bread dough need to rise?", "How much time does dough need for its first rise?", "about 1 to 2 hours"),
    ("How much water should an adult drink per day?", "How many liters of water does a person need daily?", "about 2 liters"),
    ("How fast does a person usually walk?", "What is a normal walking speed?", "about 5 kilometers per hour"),
    ("How tall is an adult giraffe?", "How high does a grown giraffe stand?", "about 5 meters"),
    ("How long does a house cat live?", "What is the usual lifespan of a pet cat?", "about 12 to 18 years"),
    ("How heavy is an adult African elephant?", "How much does a grown African elephant weigh?", "about 6 tonnes"),
    ("How long does it take to drive 100 kilometers on a highway?", "How much time is a 100 km highway drive?", "about 1 hour"),
    ("How many languages are spoken in the world?", "Roughly how many languages do people speak today?", "about 7,000"),
    ("How long does a small cut take to heal?", "How many days until a minor cut heals?", "about 1 to 2 weeks"),
    ("How many trees are there on Earth?", "Roughly how many trees grow on the planet?", "about 3 trillion"),
    ("How deep is the ocean on average?", "What is the average depth of the sea?", "about 3,700 meters"),
    ("How long does it take to fly from Paris to Rome?", "How many hours is a flight from Paris to Rome?", "about 2 hours"),
    ("How long does it take to cook dried pasta?", "How many minutes does dry pasta need to boil?", "about 10 minutes"),
    ("How far can a car drive on a full tank?", "How many kilometers does a full tank of fuel last?", "about 600 kilometers"),
    ("How many times does a resting heart beat per minute?", "What is a normal resting heart rate?", "about 60 to 100 beats"),
    ("How long does sunlight take to reach Earth?", "How many minutes does light need to travel from the Sun to us?", "about 8 minutes"),
    ("How many hairs are on a human head?", "Roughly how many hairs does a person have on their scalp?", "about 100,000"),
    ("How long is a typical feature film?", "How many hours does an average movie last?", "about 2 hours"),
    ("How long does it take to learn to ride a bicycle?", "How much practice does a child need to ride a bike?", "a few days"),
    ("How many bones does a newborn baby have?", "Roughly how many bones is a baby born with?", "about 300"),
    ("How long does a banana stay fresh at room temperature?", "How many days can a banana sit on the counter?", "about 5 days"),
    ("How long does it take to charge a phone fully?", "How many hours does a smartphone need to charge?", "about 2 hours"),
    ("How many steps does a person take in a kilometer?", "Roughly how many steps make one kilometer?", "about 1,300 steps"),
]
CITIES = ["London", "Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Sydney", "Toronto", "Mumbai", "Nairobi",
          "Madrid", "Seoul", "Chicago", "Berlin", "Jakarta", "Dublin", "Rome", "Denver", "Lagos", "Hanoi"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
EVENTS = ["football World Cup", "Tour de France", "Wimbledon final", "chess world championship",
          "Olympic marathon", "Eurovision Song Contest"]
TASTES = ["pizza topping", "color", "season of the year", "music genre", "programming language",
          "city to live in", "breakfast", "movie of all time", "board game", "holiday destination"]
PRICES = ["a barrel of oil", "one bitcoin", "an ounce of gold", "a loaf of bread", "a share of Apple"]
PERSONAL = [("What is my favorite color?", "Which color do I like best?"),
            ("What is my name?", "Can you tell me what I am called?"),
            ("How old am I?", "What is my age?"),
            ("What did I eat for breakfast today?", "What was my breakfast this morning?"),
            ("What is my dog's name?", "What did I name my dog?"),
            ("What number am I thinking of?", "Guess the number in my head.")]


def fmt(answer, confidence):
    return f"ANSWER: {answer} | CONFIDENCE: {confidence}"


def groups(rng):
    """[(group_key, [(question, answer_line), ...]), ...]; held-out splits by group."""
    g = []
    cap_t = ["What is the capital of {c}?", "Which city is the capital of {c}?",
             "Name the capital city of {c}.", "Tell me the capital of {c}.", "{C}'s capital is which city?"]
    for c, cap in CAPITALS:
        t = rng.choice(cap_t)
        g.append((f"capital:{c}", [(t.format(c=c, C=c[0].upper() + c[1:]), fmt(cap, "high"))]))
    el_t = ["What is the chemical symbol for {e}?", "Which symbol stands for {e} on the periodic table?",
            "Give the chemical symbol of {e}."]
    for e, s in ELEMENTS:
        g.append((f"element:{e}", [(rng.choice(el_t).format(e=e), fmt(s, "high"))]))
    op_t = ["What is the opposite of {w}?", "Give me an antonym of \"{w}\".", "What word means the opposite of {w}?"]
    for w, o in OPPOSITES:
        g.append((f"opposite:{w}", [(rng.choice(op_t).format(w=w), fmt(o, "high"))]))
    ba_t = ["What is a baby {a} called?", "What do you call a young {a}?", "What is the name for a {a}'s baby?"]
    for a, b in BABY_ANIMALS:
        g.append((f"baby:{a}", [(rng.choice(ba_t).format(a=a), fmt(b, "high"))]))
    for t, f, unit in UNITS:
        qs = []
        for n in rng.sample(range(2, 10), 5):
            qs.append((t.format(n=n), fmt(f"{n * f:,} {unit}", "high")))
        g.append((f"unit:{unit}", qs))
    for k in range(60):
        op = k % 3
        if op == 0:
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            q = rng.choice(["What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}."]).format(a=a, b=b)
            ans = a + b
        elif op == 1:
            a, b = rng.randint(20, 90), rng.randint(2, 19)
            q = rng.choice(["What is {a} minus {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}."]).format(a=a, b=b)
            ans = a - b
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            q = rng.choice(["What is {a} times {b}?", "Compute {a} x {b}.", "Multiply {a} by {b}."]).format(a=a, b=b)
            ans = a * b
        g.append((f"math:{k}", [(q, fmt(str(ans), "high"))]))
    for q1, q2, ans in ESTIMATES:
        g.append((f"estimate:{q1}", [(q1, fmt(ans, "medium")), (q2, fmt(ans, "medium"))]))
    w_t = ["Will it rain in {c} next {d}?", "Is it going to be sunny in {c} next {d}?",
           "What will the weather be like in {c} next {d}?"]
    for c in CITIES:
        g.append((f"weather:{c}", [(rng.choice(w_t).format(c=c, d=rng.choice(DAYS)),
                                    fmt("cannot be known in advance", "low"))]))
    for e in EVENTS:
        g.append((f"event:{e}", [(f"Who will win the next {e}?", fmt("impossible to predict", "low")),
                                 (f"Which competitor is going to take the next {e}?",
                                  fmt("impossible to predict", "low"))]))
    for t in TASTES:
        g.append((f"taste:{t}", [(f"What is the best {t}?", fmt("a matter of personal taste", "low")),
                                 (f"Which {t} is objectively the greatest?", fmt("a matter of personal taste", "low"))]))
    for p in PRICES:
        g.append((f"price:{p}", [(f"What will {p} cost next year?", fmt("impossible to predict", "low")),
                                 (f"How much will {p} be worth twelve months from now?", fmt("impossible to predict", "low"))]))
    for q1, q2 in PERSONAL:
        g.append((f"personal:{q1}", [(q1, fmt("unknown to me", "low")), (q2, fmt("unknown to me", "low"))]))
    return g


def chat(pairs):
    msgs = []
    for q, a in pairs:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


PROSE = [
    "The kettle clicked off and the kitchen filled with steam. Outside, a thin rain was falling on the garden, and the sparrows had gathered under the hedge to wait for it to pass.",
    "Bread has been baked for thousands of years. Early loaves were flat and dense, made from crushed grain and water cooked on hot stones. Yeast, whether wild or cultivated, later gave bread its airy crumb.",
    "A good library is quiet without being silent. Pages turn, chairs creak, and somewhere a printer hums as a student collects the chapters she will read on the train home.",
    "Rivers shape the land slowly. Over centuries they carve valleys, carry sand to the sea, and build fertile plains where farmers have grown wheat, rice and vegetables for generations.",
    "The first bicycles had no pedals. Riders pushed themselves along with their feet, gliding between steps. Pedals, chains and air-filled tyres came later and turned the machine into everyday transport.",
    "Honeybees communicate with a dance. A worker returning from a rich patch of flowers moves in a figure eight, and the angle of her waggle tells the others which way to fly.",
    "Most mechanical clocks keep time with a swinging pendulum or a balance wheel. Each swing releases a gear by one tooth, and the steady ticking we hear is that escapement at work.",
    "On long train journeys people settle into small routines. Someone unpacks sandwiches, someone else opens a crossword, and the landscape slides past the window like a slow film.",
    "Gardeners often say that soil is alive. A handful of healthy earth holds millions of bacteria, fungi and tiny animals that break down leaves and return their nutrients to the roots.",
    "The lighthouse stood at the end of the rocky point. For more than a century its beam had swept across the water every ten seconds, warning ships away from the reef below.",
    "Learning a musical instrument takes patience. The first weeks are full of wrong notes and sore fingers, but practice gradually turns clumsy movements into music.",
    "Markets wake up early. By six in the morning the stalls are stacked with apples, cabbages and fresh fish, and the traders call out prices to the first customers of the day.",
    "Snow changes the sound of a city. Cars move more slowly, footsteps are muffled, and for a few hours even the busiest streets seem to hold their breath.",
    "Maps are always simplifications. A map of the underground shows the order of the stations clearly but bends the real distances, because travellers care more about connections than about miles.",
    "The old bridge was built of stone blocks without any mortar. Each block was cut so precisely that the arch held itself together under its own weight.",
    "Tea reached Europe in the seventeenth century and quickly became fashionable. At first it was expensive and kept in locked boxes; later it became the ordinary drink of millions.",
    "Children learn language astonishingly fast. By the age of four most of them use thousands of words and form sentences that follow grammar rules nobody ever explained to them.",
    "A forest after rain smells of wet earth and moss. Drops keep falling from the leaves long after the shower has ended, and mushrooms appear almost overnight.",
    "Ships once navigated by the stars. Sailors measured the angle of the sun or the pole star above the horizon to estimate how far north or south they had travelled.",
    "The museum's newest room displays everyday objects from a hundred years ago: a typewriter, a tin toy, a pair of leather boots and a radio the size of a small suitcase.",
    "Cooking rice well is a matter of proportion and patience. Rinse the grains, add the right amount of water, and resist the temptation to lift the lid while it simmers.",
    "Mountains make their own weather. Warm air rising up one slope cools and drops its rain, so the far side of a range is often dry and sunny.",
    "The village held its fair every September. There were pies to judge, a tug of war between the two pubs, and a brass band that played until the light faded.",
    "Paper was invented in China and spread slowly westward along trade routes. Before it arrived, European scribes wrote on parchment made from carefully prepared animal skins.",
    "Owls hunt mostly by sound. Their faces work like dishes that gather noise, and one ear sits slightly higher than the other, which helps them find a mouse moving under leaves.",
    "A well-written recipe lists the ingredients in the order they are used. It tells the cook what to prepare in advance and what to watch for when the dish is nearly done.",
    "The harbour was busy long before dawn. Fishing boats came in low in the water, gulls circled overhead, and crates of ice were carried along the wooden pier.",
    "Walking is one of the simplest forms of exercise. It needs no equipment, can be done almost anywhere, and a daily half hour brings real benefits to the heart and mind.",
    "Glass is made by melting sand with soda and lime at very high temperatures. While it is still soft, it can be blown, pressed or rolled into windows, bottles and lenses.",
    "In autumn the maple trees turn red and orange. The green pigment in the leaves breaks down as the days shorten, revealing colours that were hidden all summer.",
    "The small bookshop on the corner had no computer. The owner kept every title in his head and could tell a customer in seconds whether a book was on the shelves.",
    "Volcanoes are openings in the crust where molten rock reaches the surface. Some erupt violently, while others release slow rivers of lava that cool into black stone.",
    "Before refrigerators, people preserved food with salt, smoke, sugar and vinegar. Cellars stayed cool all year, and blocks of ice were cut from frozen lakes in winter.",
    "The football match ended in a draw. Both teams had chances in the last minutes, but the goalkeepers were excellent and the crowd went home arguing about the referee.",
    "A compass needle points north because it lines up with the Earth's magnetic field. Hikers use it together with a map to find their way when paths are unclear.",
    "The first photographs needed exposures of several minutes, so people had to sit perfectly still. That is one reason why faces in old portraits so rarely smile.",
    "Many birds migrate thousands of kilometres each year. They follow coastlines and rivers, use the position of the sun, and may even sense the Earth's magnetic field.",
    "Writing a letter by hand feels slower than sending a message, but the slowness is part of its charm. The writer chooses words with care, and the reader can keep the page for years.",
    "Cities are planting more trees along their streets. Trees give shade, cool the air on hot days, absorb rainwater and make walking more pleasant for everyone.",
    "The night sky far from town is crowded with stars. On a clear evening the pale band of the Milky Way stretches overhead, and satellites drift silently across it.",
    "Cheese begins as milk that is soured and curdled. The curds are pressed, salted and left to age, and time slowly develops flavours that range from mild to very strong.",
    "An orchestra tunes to a single note played by the oboe. The sound spreads through the hall, each instrument adjusts to it, and then the conductor raises her hands.",
]


def main():
    out_dir = os.path.dirname(os.path.abspath(__file__))
    rng = random.Random(SEED)
    all_groups = groups(rng)
    order = list(range(len(all_groups)))
    rng.shuffle(order)
    held_idx = set(order[::HELDOUT_EVERY])
    train_pairs, held_pairs = [], []
    for i, (_, pairs) in enumerate(all_groups):
        (held_pairs if i in held_idx else train_pairs).extend(pairs)
    rng.shuffle(train_pairs)
    rng.shuffle(held_pairs)
    train = [chat([p]) for p in train_pairs]
    # 30 extra two-turn conversations (loss on both assistant turns)
    for _ in range(30):
        train.append(chat(rng.sample(train_pairs, 2)))
    rng.shuffle(train)
    held = [chat([p]) for p in held_pairs]
    general = [{"text": t} for t in PROSE]
    for name, rows in (("train", train), ("heldout", held), ("general", general)):
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}.jsonl: {len(rows)} records")


if __name__ == "__main__":
    main()
