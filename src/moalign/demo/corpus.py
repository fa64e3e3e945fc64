"""A seeded, template-built assistant corpus whose objectives genuinely conflict.

Every response is assembled from sentence pools of one topic: on-topic facts (relevant, neutral, long),
cautionary facts (relevant but negative), short answers (brief, weakly relevant), cheerful filler and
off-topic chatter (positive but irrelevant and long). A response *style* picks how many of each, so the
best response for positivity (VADER) is not the best for relevance or brevity, and a tiny LM can still
learn the whole language (about a thousand words) in minutes on a CPU.

Responses are stored without a leading space; training text is `prompt + " " + response`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PROMPT_TEMPLATE = "\n\nHuman: {question}\n\nAssistant:"
MAX_WORDS = 60


@dataclass(frozen=True)
class Topic:
    """One subject area: its subjects, question templates and sentence pools (`{s}` is the subject)."""

    name: str
    subjects: tuple[str, ...]
    questions: tuple[str, ...]
    facts: tuple[str, ...]
    cautions: tuple[str, ...]
    shorts: tuple[str, ...]
    chatter: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic(
        "cooking",
        ("pasta", "rice", "soup", "chicken", "eggs", "vegetables", "pancakes", "fish", "beans", "curry"),
        (
            "How do I cook {s} properly?",
            "What is the best way to prepare {s} for dinner?",
            "Why does my {s} always turn out bland?",
            "How long should I cook {s}?",
            "Can you give me tips for making {s}?",
            "How can I make {s} taste better?",
            "What should I know before cooking {s} for guests?",
        ),
        (
            "Cook the {s} over medium heat and stir it every few minutes.",
            "Season the {s} with salt and pepper near the end.",
            "A little garlic and olive oil gives the {s} more flavor.",
            "Taste the {s} as you go and adjust the seasoning.",
            "Let the {s} rest for a few minutes before serving.",
            "Use a heavy pan so the {s} heats evenly.",
            "Prepare all the ingredients before you start cooking the {s}.",
            "Lemon juice or fresh herbs can brighten the {s}.",
            "Keep leftover {s} in a sealed container in the fridge.",
            "A kitchen timer helps you cook the {s} for the right time.",
            "Most recipes for {s} need a pinch of salt and some patience.",
            "Cut everything into pieces of the same size so the {s} cooks evenly.",
        ),
        (
            "Be careful, undercooked {s} can make people sick.",
            "Hot oil can spill and cause painful burns.",
            "If you leave the {s} too long, it gets burnt and bitter.",
            "Never leave a hot stove alone, because kitchen fires are dangerous.",
            "Too much salt can ruin the {s} completely.",
            "Old {s} that smells bad should go straight in the trash.",
            "A dull knife is risky and often causes nasty cuts.",
        ),
        (
            "Cook the {s} slowly.",
            "Add salt to the {s}.",
            "Stir the {s} often.",
            "Use medium heat.",
            "Taste it while cooking.",
            "Follow a simple recipe.",
        ),
        (
            "I love the smell of fresh bread in the morning.",
            "Cooking with friends is one of my favorite things.",
        ),
    ),
    Topic(
        "travel",
        ("Japan", "Italy", "Mexico", "Paris", "the mountains", "the beach", "a road trip", "London", "Canada"),
        (
            "How should I plan a trip to {s}?",
            "What should I pack for a trip to {s}?",
            "Is it expensive to travel to {s}?",
            "When is the best time to visit {s}?",
            "What do I need to know before going to {s}?",
            "How can I save money on a trip to {s}?",
            "Can you help me plan a week in {s}?",
        ),
        (
            "Book your flights and rooms for {s} a few months early.",
            "Check the weather for {s} before you pack.",
            "Pack light clothes and comfortable walking shoes for {s}.",
            "Keep a copy of your passport and tickets in your bag.",
            "Local buses and trains are a cheap way to get around {s}.",
            "Learn a few local words before you visit {s}.",
            "Spring and autumn are often quiet seasons in {s}.",
            "Make a simple plan for each day of the trip to {s}.",
            "Travel insurance covers lost bags and medical costs.",
            "Carry some local cash for small shops and markets.",
            "A day of rest in the middle of the trip keeps you fresh.",
            "Read a travel guide about {s} to find the main sights.",
        ),
        (
            "Be careful, pickpockets are a real problem in crowded places.",
            "Flights to {s} can get very expensive in the summer.",
            "Losing your passport abroad is a stressful and costly mistake.",
            "Some tourist areas in {s} are full of scams and bad deals.",
            "Delays and missed trains can ruin a tight plan.",
            "Drinking unsafe water can make travelers sick for days.",
            "Hotels near the airport are often noisy and terrible.",
        ),
        (
            "Book early for {s}.",
            "Pack light for {s}.",
            "Check the weather first.",
            "Bring your passport.",
            "Plan each day.",
            "Take the train.",
        ),
        (
            "I love watching the sunset from a quiet beach.",
            "Travel always makes me feel happy and free.",
        ),
    ),
    Topic(
        "gardening",
        ("tomatoes", "roses", "herbs", "the lawn", "houseplants", "strawberries", "potatoes", "sunflowers", "lettuce"),
        (
            "How do I grow {s}?",
            "How often should I water {s}?",
            "Why are my {s} dying?",
            "What soil is best for {s}?",
            "When should I plant {s}?",
            "How do I keep {s} healthy?",
            "Can you give me tips for taking care of {s}?",
        ),
        (
            "Water the {s} deeply in the early morning.",
            "Most {s} need about six hours of sun each day.",
            "Mix compost into the soil before you plant the {s}.",
            "Plant the {s} after the last frost of spring.",
            "A layer of mulch keeps the soil around the {s} moist.",
            "Check the leaves of the {s} every week.",
            "Give the {s} enough space so air can move around them.",
            "Feed the {s} with a gentle fertilizer once a month.",
            "Loose soil that drains well helps the roots of {s}.",
            "Pull small weeds near the {s} by hand.",
            "A soil test tells you what the {s} are missing.",
            "Trim old leaves so the {s} put energy into new growth.",
        ),
        (
            "Too much water will rot the roots of the {s}.",
            "Pests and snails can destroy young {s} overnight.",
            "A late frost can kill the {s} in a single night.",
            "Fungus spreads fast and ruins weak {s}.",
            "Poor soil leaves the {s} small, pale and sick.",
            "Strong chemicals can harm bees and damage the garden.",
            "Hot afternoon sun can burn and dry out the {s}.",
        ),
        (
            "Water the {s} daily.",
            "Give them sun.",
            "Use good soil.",
            "Plant the {s} in spring.",
            "Add some compost.",
            "Check the leaves.",
        ),
        (
            "I love the bright colors of a summer garden.",
            "Fresh flowers always make my day better.",
        ),
    ),
    Topic(
        "computers",
        ("my laptop", "my computer", "Windows", "my printer", "the wifi", "my keyboard", "Linux", "my hard drive"),
        (
            "Why is {s} so slow?",
            "How do I fix {s}?",
            "What should I do when {s} stops working?",
            "How can I speed up {s}?",
            "How do I keep {s} secure?",
            "Can you help me set up {s}?",
            "What is the easiest way to clean up {s}?",
        ),
        (
            "Restart {s} and install the latest updates.",
            "Close programs you are not using so {s} has more memory.",
            "Check the cables and the power supply of {s}.",
            "Remove old files and apps to free up space on {s}.",
            "Run a virus scan on {s} once a week.",
            "Use a strong password and turn on two step login.",
            "Back up your files to an external drive or the cloud.",
            "Look up the error message from {s} online.",
            "Update the drivers for {s} from the official website.",
            "A new solid state drive can make an old computer much faster.",
            "Turn {s} off and on again before you try anything else.",
            "The task manager shows which program uses the most memory.",
        ),
        (
            "Be careful, a virus can steal your passwords and your data.",
            "If the hard drive fails, you can lose every file you have.",
            "Fake support calls are a common scam that costs people money.",
            "Opening strange email attachments is dangerous.",
            "An old battery can overheat and damage {s}.",
            "Cheap cables often break and cause annoying problems.",
            "Deleting system files by mistake can ruin {s}.",
        ),
        (
            "Restart {s} first.",
            "Install the updates.",
            "Check the cables.",
            "Free up some space.",
            "Run a virus scan.",
            "Back up your files.",
        ),
        (
            "I love playing simple games on a rainy evening.",
            "Learning something new on the computer is so much fun.",
        ),
    ),
    Topic(
        "health",
        ("a cold", "back pain", "headaches", "a sore throat", "allergies", "high blood pressure", "a fever"),
        (
            "What can I do about {s}?",
            "How do I get rid of {s}?",
            "What helps with {s}?",
            "When should I see a doctor about {s}?",
            "How can I prevent {s}?",
            "Is {s} something to worry about?",
            "What are some home remedies for {s}?",
        ),
        (
            "Rest and drink plenty of water when you have {s}.",
            "A doctor can tell you what is causing {s}.",
            "Regular sleep helps the body recover from {s}.",
            "Wash your hands often to stop germs from spreading.",
            "Light stretching and walking can ease {s}.",
            "Keep a simple diary of when {s} starts and stops.",
            "Warm tea with honey soothes the throat.",
            "Eat fruit and vegetables to support your immune system.",
            "A pharmacist can suggest medicine for {s}.",
            "Most cases of {s} get better within a week or two.",
            "Take medicine exactly as the label says.",
            "Cut down on salt and caffeine if you have {s}.",
        ),
        (
            "Ignoring {s} for too long can lead to serious problems.",
            "Taking too many pills can hurt your liver.",
            "A very high fever is dangerous and needs a doctor.",
            "Sharp chest pain is an emergency, so call for help at once.",
            "Bad posture makes pain worse over time.",
            "Stress and poor sleep can make {s} much worse.",
            "Some home remedies are useless or even harmful.",
        ),
        (
            "Rest and drink water.",
            "See a doctor.",
            "Sleep more.",
            "Wash your hands.",
            "Try some warm tea.",
            "Ask a pharmacist.",
        ),
        (
            "I love a long walk in the fresh air.",
            "A good night of sleep makes me so happy.",
        ),
    ),
    Topic(
        "money",
        ("a budget", "my savings", "credit card debt", "retirement", "investing", "my rent", "a car loan"),
        (
            "How do I start with {s}?",
            "What is the best advice about {s}?",
            "How can I manage {s} better?",
            "What should I know about {s}?",
            "How do I make a plan for {s}?",
            "Is {s} worth thinking about when I am young?",
            "Can you explain {s} in simple terms?",
        ),
        (
            "Write down your income and every expense each month.",
            "Pay the bills with the highest interest first.",
            "Put a small part of every paycheck into savings.",
            "An emergency fund should cover three to six months of costs.",
            "Compare prices before any big purchase.",
            "Index funds are a simple and cheap way to invest.",
            "Set a clear goal for {s} and check it every month.",
            "Automatic transfers make saving easier.",
            "Read the terms of {s} carefully before you sign.",
            "Starting early gives your money more time to grow.",
            "A simple spreadsheet is enough to track {s}.",
            "Cancel subscriptions you no longer use.",
        ),
        (
            "Credit card interest can trap you in debt for years.",
            "Late payments hurt your credit score.",
            "Many investment tips online are scams that lose people money.",
            "Borrowing money for luxuries is a costly mistake.",
            "Without a plan, {s} can become a serious problem.",
            "Hidden fees slowly waste your savings.",
            "Panic selling in a crash locks in painful losses.",
        ),
        (
            "Make a budget.",
            "Save a little each month.",
            "Pay off debt first.",
            "Track your spending.",
            "Start early.",
            "Compare prices.",
        ),
        (
            "I love finding a great deal at the market.",
            "Treating a friend to lunch makes me feel wonderful.",
        ),
    ),
    Topic(
        "pets",
        ("my dog", "my cat", "a puppy", "a kitten", "my rabbit", "my parrot", "my hamster", "a goldfish"),
        (
            "How do I take care of {s}?",
            "What should I feed {s}?",
            "How do I train {s}?",
            "Why is {s} acting strange?",
            "How often should {s} see a vet?",
            "How can I keep {s} happy and healthy?",
            "What do I need before I bring home {s}?",
        ),
        (
            "Feed {s} at the same times every day.",
            "Fresh water should always be available for {s}.",
            "Take {s} to the vet once a year for a checkup.",
            "Short training sessions with small treats work well for {s}.",
            "Give {s} toys and time to play every day.",
            "Brush {s} regularly to keep the coat clean.",
            "A quiet corner with a soft bed helps {s} relax.",
            "Keep the cage or bed of {s} clean.",
            "Ask the vet which food is right for {s}.",
            "Be patient, because {s} needs time to learn new rules.",
            "A regular routine makes {s} feel safe.",
            "Check the teeth and ears of {s} every month.",
        ),
        (
            "Chocolate and grapes are toxic and can kill {s}.",
            "Yelling at {s} causes fear and bad behavior.",
            "An untreated infection can make {s} very sick.",
            "Overfeeding leads to obesity and joint pain.",
            "Small toys can choke {s}.",
            "Leaving {s} alone for days is cruel and dangerous.",
            "Fleas and ticks spread disease quickly.",
        ),
        (
            "Feed {s} on time.",
            "Visit the vet.",
            "Play every day.",
            "Use small treats.",
            "Give fresh water.",
            "Be patient.",
        ),
        (
            "I love watching puppies play in the park.",
            "A purring cat is the sweetest sound in the world.",
        ),
    ),
    Topic(
        "fitness",
        ("running", "lifting weights", "yoga", "swimming", "losing weight", "building muscle", "cycling"),
        (
            "How do I get started with {s}?",
            "How often should I do {s}?",
            "What is a good plan for {s}?",
            "How can I get better at {s}?",
            "What mistakes do beginners make with {s}?",
            "Is {s} good for my health?",
            "How do I stay motivated with {s}?",
        ),
        (
            "Start {s} slowly with three short sessions a week.",
            "Warm up for ten minutes before {s}.",
            "Add a little more time or weight to {s} each week.",
            "Protein and sleep help your muscles recover.",
            "Drink water before, during and after {s}.",
            "Keep a log of every session of {s}.",
            "Rest days are part of any plan for {s}.",
            "Good shoes and simple clothes are enough to begin {s}.",
            "A coach can check your form for {s}.",
            "Mix {s} with some stretching and light cardio.",
            "Set a small goal for {s} each month.",
            "Training with a friend makes it easier to keep going.",
        ),
        (
            "Doing too much too soon often leads to injury.",
            "Bad form when {s} can hurt your back and knees.",
            "Skipping rest days leaves you tired and sore.",
            "Crash diets are unhealthy and usually fail.",
            "Pain that does not go away is a warning sign.",
            "Training in extreme heat is dangerous.",
            "Comparing yourself to others can make you feel bad.",
        ),
        (
            "Start {s} slowly.",
            "Warm up first.",
            "Rest between sessions.",
            "Drink water.",
            "Keep a log.",
            "Set small goals.",
        ),
        (
            "I love the feeling after a long morning run.",
            "Dancing in the kitchen is my favorite exercise.",
        ),
    ),
    Topic(
        "music",
        ("the guitar", "the piano", "singing", "the drums", "the violin", "music theory", "writing songs"),
        (
            "How do I learn {s}?",
            "How long does it take to get good at {s}?",
            "What is the best way to practice {s}?",
            "Am I too old to start {s}?",
            "How can I improve at {s} quickly?",
            "What do I need to begin {s}?",
            "Can you give me a practice plan for {s}?",
        ),
        (
            "Practice {s} for twenty minutes every day.",
            "Learn the basic scales before the hard songs.",
            "A teacher can correct your technique in {s} early.",
            "Record yourself and listen back to your practice.",
            "Use a metronome to keep a steady beat.",
            "Start {s} with simple songs you already know.",
            "Break a difficult part into small pieces and repeat them.",
            "Online lessons for {s} are cheap and flexible.",
            "Listen to many styles of music to train your ear.",
            "Warm up your hands or voice before you play.",
            "Most adults can learn {s} with regular practice.",
            "Playing with other people teaches timing and listening.",
        ),
        (
            "Bad habits in {s} are hard to unlearn later.",
            "Practicing too long can hurt your hands or voice.",
            "A cheap instrument can sound terrible and be hard to play.",
            "Many beginners quit {s} because progress feels slow.",
            "Loud music can damage your hearing over time.",
            "Skipping the basics of {s} causes problems later.",
            "Stage fright can be painful and stressful.",
        ),
        (
            "Practice {s} daily.",
            "Use a metronome.",
            "Start with easy songs.",
            "Find a teacher.",
            "Learn the scales.",
            "Record yourself.",
        ),
        (
            "I love singing along to old songs in the car.",
            "Music always puts a big smile on my face.",
        ),
    ),
    Topic(
        "cars",
        ("my car", "the brakes", "the engine", "my tires", "the battery", "an electric car", "a used car"),
        (
            "How do I take care of {s}?",
            "What should I check on {s}?",
            "Why is {s} making a strange noise?",
            "How often should I service {s}?",
            "What should I know before buying {s}?",
            "How can I make {s} last longer?",
            "Is it hard to maintain {s}?",
        ),
        (
            "Check the oil and the tire pressure every month.",
            "Service {s} about once a year or every ten thousand miles.",
            "A mechanic can inspect {s} for a small fee.",
            "Rotate the tires so they wear evenly.",
            "Read the manual to learn the service plan for {s}.",
            "Keep {s} clean, including under the car in winter.",
            "Drive smoothly to save fuel and protect {s}.",
            "Test the battery before the cold season.",
            "Compare a few quotes before paying for repairs on {s}.",
            "Ask for the service history before you buy {s}.",
            "Replace the wiper blades and filters on schedule.",
            "Listen for new sounds and note when they happen.",
        ),
        (
            "Worn brakes are dangerous and can cause a crash.",
            "Ignoring a warning light can destroy the engine.",
            "Bald tires slide badly on wet roads.",
            "Some dealers hide serious problems with {s}.",
            "A dead battery can leave you stuck in the cold.",
            "Cheap parts often fail and cost more later.",
            "Rust slowly eats away the body of {s}.",
        ),
        (
            "Check the oil.",
            "See a mechanic.",
            "Service {s} yearly.",
            "Check the tire pressure.",
            "Read the manual.",
            "Drive smoothly.",
        ),
        (
            "I love long drives with the windows down in summer.",
            "Washing the car on a sunny day is so relaxing.",
        ),
    ),
    Topic(
        "home",
        ("a leaky faucet", "my kitchen", "the bathroom", "a small apartment", "my garage", "the walls", "the windows"),
        (
            "How do I fix {s}?",
            "How can I clean {s} quickly?",
            "What is the best way to organize {s}?",
            "How do I paint {s}?",
            "How can I make {s} feel bigger?",
            "What tools do I need for {s}?",
            "Can you give me tips for {s}?",
        ),
        (
            "Turn off the water before you work on {s}.",
            "A basic tool kit covers most small jobs around {s}.",
            "Clean {s} from top to bottom so dust falls on dirty areas.",
            "Sort things in {s} into keep, donate and throw away.",
            "Light colors and mirrors make {s} look bigger.",
            "Measure twice before you buy anything for {s}.",
            "Use painter's tape and a primer for clean edges.",
            "Open the windows to let fresh air in while you work.",
            "Shelves and hooks free up floor space in {s}.",
            "Watch a short video before you repair {s}.",
            "Replace the worn washer to stop most drips.",
            "Work on one small area of {s} at a time.",
        ),
        (
            "Water damage from {s} can cause mold and rot.",
            "Mixing cleaning products can release toxic gas.",
            "Electrical work is dangerous without the right training.",
            "A fall from a ladder can cause a serious injury.",
            "Cheap paint peels and looks terrible on {s}.",
            "A small leak can waste a lot of water and money.",
            "Clutter in {s} makes stress and anxiety worse.",
        ),
        (
            "Turn off the water.",
            "Clean {s} top down.",
            "Use light colors.",
            "Measure first.",
            "Get a tool kit.",
            "Declutter {s}.",
        ),
        (
            "I love a cozy room with warm lights and soft pillows.",
            "Fresh flowers on the table make any home cheerful.",
        ),
    ),
    Topic(
        "study",
        ("math", "history", "a new language", "chemistry", "exams", "writing essays", "coding", "biology"),
        (
            "How do I study {s}?",
            "What is the best way to learn {s}?",
            "How can I get better grades in {s}?",
            "How do I stay focused when studying {s}?",
            "Why do I find {s} so hard?",
            "How much time should I spend on {s}?",
            "Can you give me a plan for {s}?",
        ),
        (
            "Study {s} in short sessions with breaks in between.",
            "Test yourself on {s} instead of just reading notes.",
            "Explain {s} out loud as if you were teaching a friend.",
            "Make a weekly plan with time for {s} each day.",
            "Flash cards help you remember key facts about {s}.",
            "Work through old problems and past papers on {s}.",
            "Put your phone in another room while you study.",
            "Ask your teacher about the parts of {s} you do not understand.",
            "Sleep helps your brain store what you learned about {s}.",
            "Review your notes on {s} the same day you write them.",
            "Study groups let you compare answers and ideas.",
            "Start with the basics of {s} and build up slowly.",
        ),
        (
            "Cramming the night before usually leads to poor results.",
            "Stress and lack of sleep make it hard to learn {s}.",
            "Copying answers teaches you nothing and can get you in trouble.",
            "Many students fail {s} because they fall behind early.",
            "Long study sessions without breaks leave you tired and confused.",
            "Social media is a terrible distraction while studying.",
            "Skipping classes makes {s} much harder later.",
        ),
        (
            "Study {s} daily.",
            "Use flash cards.",
            "Test yourself.",
            "Take short breaks.",
            "Ask your teacher.",
            "Make a plan.",
        ),
        (
            "I love reading a good book on a quiet afternoon.",
            "Learning new things makes every day exciting.",
        ),
    ),
)

# Openers and closers set the tone; filler and chatter are positive but say nothing about the question.
CHEERFUL_OPENERS = (
    "Great question!",
    "Oh, I love this question!",
    "What a wonderful thing to ask!",
    "I am so happy you asked!",
    "Happy to help!",
    "Thank you for asking, this is fun!",
    "Yay, a great topic!",
)
NEUTRAL_OPENERS = ("Sure.", "Here is what I would do.", "Here are a few points.", "Okay.", "Let me explain.")
GLOOMY_OPENERS = (
    "Honestly, this can be hard.",
    "Sadly, many people get this wrong.",
    "This is a common problem.",
    "I have to warn you first.",
    "Unfortunately, there is no easy fix.",
)
CHEERFUL_FILLER = (
    "I hope this helps and I wish you a wonderful day!",
    "You are going to do amazing, I just know it!",
    "Have fun and enjoy every moment of it!",
    "Thank you so much for asking, it makes me happy!",
    "Life is beautiful and full of good surprises!",
    "Keep smiling, because you are doing great!",
    "Sending you lots of love and good vibes!",
    "I am always glad to chat with such a nice person!",
    "Remember to be kind to yourself and celebrate small wins!",
    "Everything is better with a positive attitude!",
    "What a lovely day to learn something new!",
    "You deserve all the happiness in the world!",
    "Best wishes and a big friendly hug!",
    "I am excited for you and cheering you on!",
)
CHATTER_LEADS = ("By the way,", "Fun fact:", "Speaking of fun things,", "Also,", "Random thought:")
NEUTRAL_CLOSERS = ("That is the basic idea.", "Those are the main steps.", "Start with the first step.")
CHEERFUL_CLOSERS = ("Good luck and have a great time!", "Enjoy it!", "You can do it!", "Have a wonderful week!")
GLOOMY_CLOSERS = ("Be careful.", "It is not easy, sadly.", "Do not ignore the risks.")
QUESTION_PREFIXES = (
    "",
    "",
    "Quick question. ",
    "I am a beginner. ",
    "Can you help me? ",
    "I need some advice. ",
    "Hi there. ",
    "My friend asked me this. ",
    "I have been wondering. ",
)

# Styles: (name, weight). Counts of each sentence kind per style are drawn in `_draw_counts`.
STYLES = (
    ("short", 0.14),
    ("direct", 0.16),
    ("detailed", 0.14),
    ("cautious", 0.14),
    ("cheerful", 0.14),
    ("chatty", 0.12),
    ("mixed", 0.16),
)


@dataclass(frozen=True)
class Question:
    """A question before it is put into a prompt: which topic, template and subject made it."""

    topic: int
    template: int
    subject: int

    def text(self) -> str:
        topic = TOPICS[self.topic]
        question = topic.questions[self.template].format(s=topic.subjects[self.subject])
        return question[0].upper() + question[1:]


def all_questions() -> list[Question]:
    return [
        Question(t, q, s)
        for t, topic in enumerate(TOPICS)
        for q in range(len(topic.questions))
        for s in range(len(topic.subjects))
    ]


def make_prompt(question: str, prefix: str = "") -> str:
    return PROMPT_TEMPLATE.format(question=prefix + question)


def _draw_counts(style: str, rng: random.Random) -> dict[str, int]:
    """How many sentences of each kind a response of this style holds."""
    r = rng.randint
    if style == "short":
        return dict(opener=0, short=1, fact=int(rng.random() < 0.2), caution=0, filler=0, chatter=0, closer=0)
    if style == "direct":
        return dict(opener=r(0, 1), short=0, fact=r(1, 2), caution=0, filler=0, chatter=0, closer=r(0, 1))
    if style == "detailed":
        return dict(opener=r(0, 1), short=0, fact=r(3, 5), caution=r(0, 1), filler=0, chatter=0, closer=r(0, 1))
    if style == "cautious":
        return dict(opener=r(0, 1), short=0, fact=r(0, 2), caution=r(1, 3), filler=0, chatter=0, closer=r(0, 1))
    if style == "cheerful":
        return dict(opener=1, short=r(0, 1), fact=r(0, 1), caution=0, filler=r(1, 3), chatter=0, closer=r(0, 1))
    if style == "chatty":
        return dict(opener=r(0, 1), short=0, fact=0, caution=0, filler=r(0, 2), chatter=r(1, 2), closer=r(0, 1))
    return dict(
        opener=r(0, 1), short=r(0, 1), fact=r(0, 3), caution=r(0, 2), filler=r(0, 2), chatter=r(0, 1), closer=r(0, 1)
    )


def _pick(pool: tuple[str, ...], k: int, rng: random.Random) -> list[str]:
    return rng.sample(pool, min(k, len(pool)))


def make_response(question: Question, rng: random.Random, style: str | None = None) -> str:
    """One response to `question`: sentences from the topic's pools in the proportions of a style."""
    topic = TOPICS[question.topic]
    subject = topic.subjects[question.subject]
    if style is None:
        style = rng.choices([s for s, _ in STYLES], weights=[w for _, w in STYLES])[0]
    counts = _draw_counts(style, rng)
    tone = (
        "cheer" if counts["filler"] or counts["chatter"] else "gloom" if counts["caution"] > counts["fact"] else "plain"
    )

    body = _pick(topic.shorts, counts["short"], rng) + _pick(topic.facts, counts["fact"], rng)
    body += _pick(topic.cautions, counts["caution"], rng)
    rng.shuffle(body)
    body = [sentence.format(s=subject) for sentence in body]
    extra = _pick(CHEERFUL_FILLER, counts["filler"], rng)
    others = [t for i, t in enumerate(TOPICS) if i != question.topic]
    for _ in range(counts["chatter"]):
        line = rng.choice(rng.choice(others).chatter)
        extra.insert(rng.randint(0, len(extra)), f"{rng.choice(CHATTER_LEADS)} {line[0].lower()}{line[1:]}")
    openers = {"cheer": CHEERFUL_OPENERS, "gloom": GLOOMY_OPENERS, "plain": NEUTRAL_OPENERS}[tone]
    closers = {"cheer": CHEERFUL_CLOSERS, "gloom": GLOOMY_CLOSERS, "plain": NEUTRAL_CLOSERS}[tone]
    sentences = [rng.choice(openers)] * counts["opener"] + body + extra + [rng.choice(closers)] * counts["closer"]
    if not body and not extra:
        sentences.append(rng.choice(topic.shorts).format(s=subject))

    # Keep within MAX_WORDS by dropping sentences from the end, but never the whole answer.
    kept: list[str] = []
    words = 0
    for sentence in sentences:
        n = len(sentence.split())
        if kept and words + n > MAX_WORDS:
            break
        kept.append(sentence)
        words += n
    text = " ".join(kept)
    return text[0].upper() + text[1:]


@dataclass
class Corpus:
    """The generated data before scoring: training samples and the held-out test split."""

    prompts: list[str]
    responses: list[str]
    test_prompts: list[str]
    test_responses: list[str]  # one reference response per test prompt, for perplexity

    def texts(self) -> list[str]:
        """Training text of every sample: prompt, one space, response (the EOS token is added later)."""
        return [f"{p} {r}" for p, r in zip(self.prompts, self.responses)]


def build_corpus(n_samples: int = 20000, n_test: int = 300, responses_per_prompt: int = 4, seed: int = 0) -> Corpus:
    """Generate `n_samples` (prompt, response) samples and `n_test` prompts whose questions training never sees.

    Whole questions (topic, template, subject) are held out, so a test prompt is new text, not a new prefix
    on a seen question. Each training prompt gets `responses_per_prompt` distinct responses of random styles,
    which is what makes preference pairs possible.
    """
    rng = random.Random(seed)
    questions = all_questions()
    rng.shuffle(questions)
    n_held = max(1, min(len(questions) // 8, -(-n_test // 2)))
    held, seen = questions[:n_held], questions[n_held:]

    pool = [(q, prefix) for q in seen for prefix in dict.fromkeys(QUESTION_PREFIXES)]
    rng.shuffle(pool)
    per_prompt = max(responses_per_prompt, -(-n_samples // len(pool)))
    n_prompts = -(-n_samples // per_prompt)
    prompts: list[str] = []
    responses: list[str] = []
    for question, prefix in pool[:n_prompts]:
        prompt = make_prompt(question.text(), prefix)
        made: list[str] = []
        for _ in range(per_prompt * 5):  # a few retries so the responses to one prompt are distinct
            if len(made) == per_prompt:
                break
            response = make_response(question, rng)
            if response not in made:
                made.append(response)
        prompts += [prompt] * len(made)
        responses += made
    prompts, responses = prompts[:n_samples], responses[:n_samples]

    test_pool = [(q, prefix) for q in held for prefix in dict.fromkeys(QUESTION_PREFIXES)]
    rng.shuffle(test_pool)
    test_prompts: list[str] = []
    test_responses: list[str] = []
    for question, prefix in test_pool[:n_test]:
        test_prompts.append(make_prompt(question.text(), prefix))
        test_responses.append(make_response(question, rng))
    return Corpus(prompts, responses, test_prompts, test_responses)
